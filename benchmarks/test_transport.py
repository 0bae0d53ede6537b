"""Transport round trip on loopback: one ALOHA observation (three 224×224×3 uint8 images + 14 float32 proprio) out,
one 50×14 float32 chunk back, from a policy that answers at once, so only the transport is measured.

- cosmos-edge: `PolicyClient` → `PolicyServer` (ZeroMQ multipart, msgpack header, raw array frames, validation).
- cosmos_edge_http: cosmos-edge's official-compatible endpoint (`serve --http`): the official request (json_numpy
  body, the official keys) over `requests`, `HttpEndpoint` (starlette + uvicorn) → the same `PolicyServer` queue and
  worker as the ZeroMQ row, and the official reply (50 json_numpy rows). Same client as the FastAPI row.
- fastapi_json_numpy: the official Cosmos Policy transport, FastAPI + uvicorn `POST /act` with arrays encoded by
  json_numpy (base64 inside JSON) and a synchronous handler. The client keeps one HTTP connection alive
  (`requests.Session`), which flatters it: the official client opens a new connection per `requests.post`.
- websocket_msgpack: openpi's transport, an asyncio websockets server and the synchronous websockets client,
  carrying msgpack with numpy arrays as raw bytes (openpi's msgpack_numpy scheme, reimplemented here).

Run: `.venv/bin/python -m pytest benchmarks/test_transport.py --benchmark-enable --benchmark-json=out.json`.
`extra_info` carries p50/p90/p99 in ms and the payload sizes. The baselines need fastapi, uvicorn, json-numpy,
requests and websockets, and are skipped without them; the HTTP row needs starlette, uvicorn, json-numpy, requests.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from cosmos_edge.robot_bridge.binding import ServerConfig
from cosmos_edge.robot_bridge.client import PolicyClient
from cosmos_edge.robot_bridge.official_act import CAMERAS
from cosmos_edge.robot_bridge.protocol import ActRequest, decode_request
from cosmos_edge.robot_bridge.server import PolicyServer, serving_in_thread
from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec, platform_spec
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult, Observation

ALOHA = platform_spec("aloha")
INSTRUCTION = "put the cube in the bowl"
RNG = np.random.default_rng(0)
IMAGES = {name: RNG.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for name in ALOHA.cameras}
PROPRIO = RNG.standard_normal(ALOHA.proprio_dim).astype(np.float32)
CHUNK = RNG.standard_normal((ALOHA.chunk_size, ALOHA.action_dim)).astype(np.float32)
ROUNDS = {"cosmos_edge": 1000, "websocket_msgpack": 1000, "fastapi_json_numpy": 200, "cosmos_edge_http": 200}
STARTUP_S = 10.0


class InstantPolicy:
    """Answers every query with the same chunk."""

    @property
    def platform(self) -> PlatformSpec:
        return ALOHA

    @property
    def instructions(self) -> tuple[str, ...]:
        return (INSTRUCTION,)

    def infer(self, query: ActionQuery) -> ChunkResult:
        return ChunkResult(actions=CHUNK, value=0.5, future_proprio=PROPRIO)

    def reset(self) -> None:
        pass


def run_benchmark(benchmark: Any, name: str, round_trip: Callable[[], np.ndarray], sizes: dict[str, int]) -> None:
    actions = round_trip()
    np.testing.assert_array_equal(actions, CHUNK)
    benchmark.pedantic(round_trip, rounds=ROUNDS[name], warmup_rounds=20)
    benchmark.extra_info.update({"transport": name, **sizes})
    if benchmark.stats is not None:  # None under --benchmark-disable
        data = np.asarray(benchmark.stats.stats.sorted_data) * 1e3
        for q in (50, 90, 99):
            benchmark.extra_info[f"p{q}_ms"] = float(np.percentile(data, q))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- cosmos-edge -----------------------------------------------------------------------------------------------------


@pytest.fixture
def cosmos_edge_client() -> Iterator[PolicyClient]:
    server = PolicyServer(InstantPolicy(), ServerConfig("tcp://127.0.0.1:*"))
    endpoint = server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with PolicyClient(endpoint, timeout_s=STARTUP_S) as client:
            yield client
    finally:
        server.stop()
        thread.join(STARTUP_S)


def test_cosmos_edge(benchmark: Any, cosmos_edge_client: PolicyClient) -> None:
    observation = Observation(images=IMAGES, proprio=PROPRIO)
    obs_ids = iter(range(10**9))

    def round_trip() -> np.ndarray:
        return cosmos_edge_client.act(observation, INSTRUCTION, obs_id=next(obs_ids), capture_time_ns=1).actions

    request = ActRequest(1, obs_id=1, capture_time_ns=1, instruction=INSTRUCTION, images=IMAGES, proprio=PROPRIO)
    request_bytes = sum(memoryview(frame).nbytes for frame in request.to_frames())
    run_benchmark(benchmark, "cosmos_edge", round_trip, {"request_bytes": request_bytes})


def test_cosmos_edge_codec(benchmark: Any) -> None:
    """Encode and decode of one `act` request alone, to separate the protocol's cost from the transport's."""
    request = ActRequest(1, obs_id=1, capture_time_ns=1, instruction=INSTRUCTION, images=IMAGES, proprio=PROPRIO)
    benchmark.pedantic(lambda: decode_request(request.to_frames()), rounds=2000, warmup_rounds=20)


# --- cosmos-edge HTTP: the official format in front of the policy server ----------------------------------------------


@pytest.fixture
def cosmos_edge_http_url() -> Iterator[str]:
    http_server = pytest.importorskip("cosmos_edge.robot_bridge.http_server")
    server = PolicyServer(InstantPolicy(), ServerConfig("tcp://127.0.0.1:*"))
    with serving_in_thread(server), http_server.HttpEndpoint(server, http_server.HttpConfig(port=0)) as http:
        yield http.url + "/act"


def test_cosmos_edge_http(benchmark: Any, cosmos_edge_http_url: str) -> None:
    json_numpy = pytest.importorskip("json_numpy")
    requests = pytest.importorskip("requests")
    session = requests.Session()
    images = {key: IMAGES[camera] for key, camera in CAMERAS.items()}
    observation = {**images, "proprio": PROPRIO, "task_description": INSTRUCTION}
    headers = {"Content-Type": "application/json"}

    def round_trip() -> np.ndarray:
        body = json_numpy.dumps(observation)
        response = session.post(cosmos_edge_http_url, data=body, headers=headers, timeout=STARTUP_S)
        response.raise_for_status()
        return np.asarray(json_numpy.loads(response.text)["actions"])

    with session:
        run_benchmark(benchmark, "cosmos_edge_http", round_trip, {"request_bytes": len(json_numpy.dumps(observation))})


# --- FastAPI + json_numpy (the official Cosmos Policy transport) ------------------------------------------------------


@pytest.fixture
def fastapi_url() -> Iterator[str]:
    fastapi = pytest.importorskip("fastapi")
    json_numpy = pytest.importorskip("json_numpy")
    uvicorn = pytest.importorskip("uvicorn")

    app = fastapi.FastAPI()

    @app.post("/act", response_model=None)
    def act(payload: dict[str, Any]) -> Any:  # synchronous like the official handler, so it runs in a threadpool
        images = [json_numpy.object_hook(payload[name]) for name in ALOHA.cameras]
        proprio = json_numpy.object_hook(payload["proprio"])
        assert all(image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for image in images) and proprio.shape == (14,)
        body = json_numpy.dumps({"actions": CHUNK, "value_prediction": 0.5})
        return fastapi.Response(content=body, media_type="application/json")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started), "uvicorn did not start"
        yield f"http://127.0.0.1:{port}/act"
    finally:
        server.should_exit = True
        thread.join(STARTUP_S)


def test_fastapi_json_numpy(benchmark: Any, fastapi_url: str) -> None:
    json_numpy = pytest.importorskip("json_numpy")
    requests = pytest.importorskip("requests")
    session = requests.Session()
    observation = {**IMAGES, "proprio": PROPRIO, "task_description": INSTRUCTION}
    headers = {"Content-Type": "application/json"}

    def round_trip() -> np.ndarray:
        body = json_numpy.dumps(observation)
        response = session.post(fastapi_url, data=body, headers=headers, timeout=STARTUP_S)
        response.raise_for_status()
        return np.asarray(json_numpy.loads(response.text)["actions"])

    with session:
        run_benchmark(
            benchmark, "fastapi_json_numpy", round_trip, {"request_bytes": len(json_numpy.dumps(observation))}
        )


# --- websocket + msgpack (openpi's transport) ------------------------------------------------------------------------


def pack_array(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {b"__ndarray__": True, b"data": value.tobytes(), b"dtype": value.dtype.str, b"shape": value.shape}
    return value


def unpack_array(value: dict[Any, Any]) -> Any:
    if b"__ndarray__" in value:
        return np.ndarray(buffer=value[b"data"], dtype=np.dtype(value[b"dtype"]), shape=value[b"shape"])
    return value


def packb(value: Any) -> bytes:
    return msgpack.packb(value, default=pack_array)


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=unpack_array)


@pytest.fixture
def websocket_url() -> Iterator[str]:
    pytest.importorskip("websockets")
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(connection: ServerConnection) -> None:
        async for message in connection:
            observation = unpackb(message)  # type: ignore[arg-type]
            assert observation["state"].shape == (14,)
            await connection.send(packb({"actions": CHUNK, "value": 0.5}))

    loop = asyncio.new_event_loop()
    stopped = loop.create_future()
    port = free_port()
    started = threading.Event()

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port, compression=None, max_size=None):
            started.set()
            await stopped

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert started.wait(STARTUP_S), "the websocket server did not start"
        yield f"ws://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stopped.set_result, None)
        thread.join(STARTUP_S)
        loop.close()


def test_websocket_msgpack(benchmark: Any, websocket_url: str) -> None:
    from websockets.sync.client import connect

    observation = {"images": IMAGES, "state": PROPRIO, "prompt": INSTRUCTION}
    with connect(websocket_url, compression=None, max_size=None) as connection:

        def round_trip() -> np.ndarray:
            connection.send(packb(observation))
            return np.asarray(unpackb(connection.recv())["actions"])  # type: ignore[arg-type]

        run_benchmark(benchmark, "websocket_msgpack", round_trip, {"request_bytes": len(packb(observation))})


def wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + STARTUP_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
