"""The official-compatible HTTP endpoint: the official ALOHA client's request path (json_numpy, `requests.post`, plain
and double-encoded) gets what the ZeroMQ server answers, through the server's one worker; errors are 4xx or 5xx JSON
naming the key at fault."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

# Imported before any test patches `json`: numpy.testing's lazy import parses JSON with a hook json_numpy breaks.
from numpy.testing import assert_allclose, assert_array_equal

from cosmos_edge.robot_bridge.binding import ServerConfig
from cosmos_edge.robot_bridge.client import PolicyClient
from cosmos_edge.robot_bridge.log_limits import RateLimitedLog, RepeatFilter
from cosmos_edge.robot_bridge.official_act import FUTURE_IMAGE_KEYS, CandidateImageLists
from cosmos_edge.robot_bridge.server import PolicyServer
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.api import (
    ActionQuery,
    ChunkResult,
    Observation,
    Policy,
)
from tests.helpers.bridge_doubles import (
    ALOHA,
    CUT_SHORT_CANDIDATES,
    INSTRUCTION,
    StubPolicy,
    expected_actions,
    serving,
    wait_for,
)

json_numpy = pytest.importorskip("json_numpy")
requests = pytest.importorskip("requests")
http_server = pytest.importorskip("cosmos_edge.robot_bridge.http_server")  # needs starlette and uvicorn
HttpConfig, HttpEndpoint, parse_address = http_server.HttpConfig, http_server.HttpEndpoint, http_server.parse_address

TIMEOUT_S = 10.0  # a loaded 2-core machine; the official client itself sets no timeout
OFFICIAL_KEYS = {
    "primary_image": "cam_high",
    "left_wrist_image": "cam_left_wrist",
    "right_wrist_image": "cam_right_wrist",
}


@pytest.fixture
def official_json() -> Iterator[None]:
    """`json_numpy.patch()`, as the official client runs at import; undone afterwards, since it patches `json`."""
    saved = (json.dumps, json.loads, json.dump, json.load)
    json_numpy.patch()
    yield
    json.dumps, json.loads, json.dump, json.load = saved


@contextmanager
def serving_both(
    policies: Policy | Mapping[str, Policy],
    image_lists: Mapping[str, CandidateImageLists] | None = None,
    **http: Any,
) -> Iterator[tuple[str, str]]:
    """A policy server on loopback ZeroMQ with the HTTP endpoint beside it; yields (ZeroMQ endpoint, HTTP URL)."""
    server = PolicyServer(policies, ServerConfig("tcp://127.0.0.1:*"))
    config = HttpConfig(port=0, **http)
    with serving(server) as endpoint, HttpEndpoint(server, config, image_lists=image_lists) as endpoint_http:
        yield endpoint, endpoint_http.url


def camera_observation(level: float) -> Observation:
    """Different images per camera, so that the camera mapping is checked."""
    rng = np.random.default_rng(int(level))
    images = {camera: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for camera in ALOHA.cameras}
    return Observation(images=images, proprio=np.arange(14, dtype=np.float32) * 0.1 + level)


def official_request(obs: Observation, proprio_dtype: type = np.float64) -> dict[str, Any]:
    """What `run_aloha_eval.py` puts in its request: images resized to 224, qpos (float64 from the robot)."""
    request: dict[str, Any] = {key: obs.images[camera] for key, camera in OFFICIAL_KEYS.items()}
    return request | {"proprio": obs.proprio.astype(proprio_dtype), "task_description": INSTRUCTION}


def get_action_from_server(
    observation: dict[str, Any], server_endpoint: str, return_all_query_results: bool = False
) -> Any:
    """The official client's call (`run_aloha_eval.get_action_from_server`), with a timeout for the test."""
    observation["return_all_query_results"] = return_all_query_results
    return requests.post(server_endpoint, json=observation, timeout=TIMEOUT_S).json()


def post_double_encoded(observation: dict[str, Any], server_endpoint: str) -> Any:
    """A client without json_numpy in its `json`: the json_numpy text wrapped in `{"encoded": ...}`."""
    body = {"encoded": json_numpy.dumps(observation)}
    reply = requests.post(server_endpoint, data=json.dumps(body), timeout=TIMEOUT_S).json()
    assert isinstance(reply, str)  # the official server answers this form with a JSON string
    return json_numpy.loads(reply)


def post(url: str, body: bytes | str) -> tuple[int, dict[str, Any]]:
    response = requests.post(url, data=body, timeout=TIMEOUT_S)
    return response.status_code, response.json()


@pytest.mark.parametrize("double_encoded", [False, True], ids=["json_numpy", "double_encoded"])
@pytest.mark.parametrize("proprio_dtype", [np.float64, np.float32])
def test_the_official_client_gets_what_the_zeromq_server_answers(
    official_json: None, double_encoded: bool, proprio_dtype: type
) -> None:
    policy = StubPolicy()
    obs = camera_observation(3.0)
    with serving_both(policy) as (endpoint, url), PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        over_zeromq = client.act(obs, INSTRUCTION, obs_id=1, capture_time_ns=1)  # the server's seed, as over HTTP
        request = official_request(obs, proprio_dtype)
        if double_encoded:
            response = post_double_encoded(request, url + "/act")
        else:
            response = get_action_from_server(request, url + "/act")
    actions = np.asarray(response["actions"])
    assert len(response["actions"]) == 50 and actions.shape == (50, 14) and actions.dtype == np.float32
    assert_allclose(actions, over_zeromq.actions, atol=1e-5, rtol=0)
    assert_allclose(actions, expected_actions(obs.proprio, seed=195), atol=1e-5, rtol=0)
    # The official client with --future_img saves a video of them (`future_image`'s shape sizes it): black frames.
    assert_black_future_images(response["future_image_predictions"])
    assert response["value_prediction"] == response["value_predictions"] == 0.25
    query = policy.queries[-1]
    assert query.seed == 195 and query.instruction == INSTRUCTION
    for camera in ALOHA.cameras:
        assert_array_equal(query.observation.images[camera], obs.images[camera])


def assert_black_future_images(images: dict[str, np.ndarray]) -> None:
    assert sorted(images) == sorted(FUTURE_IMAGE_KEYS)
    for frame in images.values():
        assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8 and not frame.any()


def test_every_inference_runs_on_the_server_worker_in_turn(official_json: None) -> None:
    class RecordingPolicy(StubPolicy):
        def __init__(self, gate: threading.Event) -> None:
            super().__init__(gate=gate)
            self.threads: list[str] = []

        def infer(self, query: ActionQuery) -> ChunkResult:
            self.threads.append(threading.current_thread().name)
            return super().infer(query)

    gate = threading.Event()
    policy = RecordingPolicy(gate)
    with (
        serving_both(policy) as (endpoint, url),
        PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        over_zeromq = pool.submit(client.act, camera_observation(1.0), INSTRUCTION, obs_id=1, capture_time_ns=1)
        assert policy.started.wait(TIMEOUT_S)
        over_http = pool.submit(get_action_from_server, official_request(camera_observation(2.0)), url + "/act")
        assert len(policy.queries) == 1  # the HTTP request waits for the worker, which is busy
        gate.set()
        assert_allclose(over_zeromq.result(TIMEOUT_S).actions, expected_actions(camera_observation(1).proprio))
        assert_allclose(over_http.result(TIMEOUT_S)["actions"], expected_actions(camera_observation(2).proprio))
    assert policy.threads == ["policy-worker", "policy-worker"]


def test_requests_of_clients_that_disconnect_while_waiting_are_never_computed(
    official_json: None, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    body = json.dumps(official_request(camera_observation(3.0))).encode()
    with caplog.at_level(logging.INFO), serving_both(policy) as (_, url), ThreadPoolExecutor(1) as pool:
        live = pool.submit(get_action_from_server, official_request(camera_observation(1.0)), url + "/act")
        assert policy.started.wait(TIMEOUT_S)  # the worker is busy with it: the others wait in the queue
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):  # whole requests, then gone (fire-and-forget clients, or ones that timed out)
            with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as gone:
                head = f"POST /act HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
                gone.sendall(head.encode() + body)
        wait_for(lambda: caplog.text.count("status=client_gone") == 3, TIMEOUT_S, "the three disconnections")
        gate.set()
        assert_allclose(live.result(TIMEOUT_S)["actions"], expected_actions(camera_observation(1).proprio))
    assert len(policy.queries) == 1  # the abandoned requests gave up their places uncomputed


def test_an_endpoint_stopped_alone_answers_its_waiting_requests_503_and_computes_none_of_them(
    official_json: None,
) -> None:
    # The HTTP endpoint stops while its policy server goes on serving (an embedding program's order).
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*"))
    with serving(server), ThreadPoolExecutor(2) as pool:
        endpoint = HttpEndpoint(server, HttpConfig(port=0, shutdown_timeout_s=0.5))
        url = endpoint.start() + "/act"
        request = official_request(camera_observation(1.0))
        running = pool.submit(post, url, json.dumps(request))
        assert policy.started.wait(TIMEOUT_S)
        queued = pool.submit(post, url, json.dumps(request))
        wait_for(lambda: endpoint._requests == 2, TIMEOUT_S, "the second request")
        endpoint.stop()
        for reply in (running.result(TIMEOUT_S), queued.result(TIMEOUT_S)):
            assert reply[0] == 503 and reply[1]["code"] == "shutting_down"
        gate.set()
        with PolicyClient(server.endpoint) as client:
            assert client.ping()  # the policy server serves on
    assert len(policy.queries) == 1  # the queued request was never computed


def test_a_flood_of_garbage_connections_gets_one_line_of_uvicorns_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), serving_both(StubPolicy()) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        for _ in range(30):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as garbage:
                garbage.sendall(b"GARBAGE\r\n\r\n")
                garbage.recv(1024)  # uvicorn answers 400 and closes
        assert requests.get(url + "/healthz", timeout=TIMEOUT_S).status_code == 200  # still serving
    invalid = [record for record in caplog.records if "Invalid HTTP request" in record.getMessage()]
    assert len(invalid) == 1  # then held back, for 5 s; the next one says how many


def test_repeated_messages_pass_once_per_interval_then_say_how_many_were_held() -> None:
    now = [0.0]
    repeats = RepeatFilter(5.0, clock=lambda: now[0])
    logger = logging.getLogger("tests.repeats")

    def passes(message: str, *args: object) -> str | None:
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, args, None)
        return record.getMessage() if repeats.filter(record) else None

    assert passes("invalid request from %s", "a") == "invalid request from a"
    assert passes("invalid request from %s", "b") is None  # the same message, other arguments: held back
    assert passes("another %d", 1) == "another 1"
    now[0] = 5.0
    assert passes("invalid request from %s", "c") == "invalid request from c (1 more like it held back)"


def test_modes_switch_for_both_endpoints(official_json: None) -> None:
    policies = {"reactive": StubPolicy(), "planning": StubPolicy(offset=1.0)}
    obs = camera_observation(4.0)
    with serving_both(policies) as (endpoint, url), PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        client.set_mode("planning")
        planned = get_action_from_server(official_request(obs), url + "/act")
        assert_allclose(planned["actions"], expected_actions(obs.proprio, offset=1.0), atol=1e-5)
        status, body = post(url + "/mode", '{"mode": "reactive"}')
        assert (status, body) == (200, {"mode": "reactive", "previous_mode": "planning"})
        assert client.metadata().mode == "reactive"
        reactive = get_action_from_server(official_request(obs), url + "/act")
        assert_allclose(reactive["actions"], expected_actions(obs.proprio), atol=1e-5)
        status, body = post(url + "/mode", '{"mode": "dreaming"}')
        assert (status, body["field"], body["code"]) == (422, "mode", "unknown_mode")
        status, body = post(url + "/mode", '{"mode": "reactive", "extra": 1}')
        assert (status, body["field"], body["code"]) == (422, "extra", "invalid_field")
        status, body = post(url + "/mode", '{"mode": 3}')
        assert (status, body["field"], body["code"]) == (422, "mode", "invalid_field")
        status, body = post(url + "/mode", "[" * 1000)
        assert (status, body["field"], body["code"]) == (400, "body", "malformed")
        status, body = post(url + "/mode", "[" * 5000)  # a mode body is small: a large one is never parsed
        assert (status, body["field"], body["code"]) == (413, "body", "too_large")


def test_all_query_results_list_the_one_query_or_every_candidate(official_json: None) -> None:
    policies = {"reactive": StubPolicy(), "planning": StubPolicy(offset=1.0, candidates=CUT_SHORT_CANDIDATES)}
    obs = camera_observation(5.0)
    world_model = {"planning": CandidateImageLists(per_depth=True)}
    with serving_both(policies, world_model) as (_, url):
        response = get_action_from_server(official_request(obs), url + "/act", return_all_query_results=True)
        assert_allclose(response["all_actions"][0], response["actions"])
        assert_allclose(response["all_actions_by_depth"][0][0], response["actions"])
        assert response["all_value_predictions"] == [0.25] and response["all_value_predictions_by_depth"] == [[0.25]]
        # The official base config: the action pass's image set, and no world-model prediction at any depth.
        assert response["all_future_image_predictions"] == [dict.fromkeys(FUTURE_IMAGE_KEYS)]
        assert response["all_future_image_predictions_by_depth"] == [[]]
        post(url + "/mode", '{"mode": "planning"}')
        planned = get_action_from_server(official_request(obs), url + "/act", return_all_query_results=True)
    assert planned["all_value_predictions"] == [0.5, 0.75, None]  # null: not scored before the deadline
    assert planned["all_value_predictions_by_depth"] == [[0.5, 0.25], [0.75, 1.0], [None, None]]
    assert_allclose(planned["all_actions"][1], CUT_SHORT_CANDIDATES.actions[1])
    assert planned["all_actions"][2] is None  # not computed in time
    # Every depth's chunk, in the order of the per-depth values, as the official `actions_by_depth`.
    assert [len(chunks) for chunks in planned["all_actions_by_depth"]] == [2, 2, 2]
    assert_allclose(planned["all_actions_by_depth"][1][1], CUT_SHORT_CANDIDATES.actions_by_depth[1, 1])
    assert planned["all_actions_by_depth"][2] == [None, None]
    assert planned["all_future_image_predictions"] == [dict.fromkeys(FUTURE_IMAGE_KEYS)] * 3
    # One (null) image set per world-model prediction, paired with the per-depth values as officially.
    assert planned["all_future_image_predictions_by_depth"] == [[dict.fromkeys(FUTURE_IMAGE_KEYS)] * 2] * 3


def test_candidates_ranked_without_a_world_model_have_no_image_sets_by_depth(official_json: None) -> None:
    policies = {"reactive": StubPolicy(), "planning": StubPolicy(offset=1.0, candidates=CUT_SHORT_CANDIDATES)}
    model_free = {"planning": CandidateImageLists(per_depth=False)}
    with serving_both(policies, model_free) as (_, url):
        post(url + "/mode", '{"mode": "planning"}')
        planned = get_action_from_server(official_request(camera_observation(6.0)), url + "/act", True)
    # A null set per candidate (the official None would crash the official client's episode saving).
    assert planned["all_future_image_predictions"] == [dict.fromkeys(FUTURE_IMAGE_KEYS)] * 3
    assert planned["all_future_image_predictions_by_depth"] == [[]] * 3
    assert_black_future_images(planned["future_image_predictions"])  # what the client indexes


def without(request: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in request.items() if name != key}


def test_keys_the_official_server_ignores_are_ignored_and_logged(
    official_json: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Other clients add keys of their own (a seed, our protocol's names): the official server reads only its own."""
    obs = camera_observation(2.0)
    request = official_request(obs)
    extra = {"seed": 7, "instruction": "dance", "proprio_history": [obs.proprio] * 2, "images_history": []}
    with caplog.at_level(logging.INFO), serving_both(StubPolicy()) as (_, url):
        plain = get_action_from_server(dict(request), url + "/act")
        with_extra = get_action_from_server(request | extra, url + "/act")
        get_action_from_server(request | extra, url + "/act")  # the same keys: no second warning
    assert_allclose(np.asarray(with_extra["actions"]), np.asarray(plain["actions"]), atol=0, rtol=0)
    assert_allclose(np.asarray(plain["actions"]), expected_actions(obs.proprio, seed=195), atol=1e-5, rtol=0)
    served = [
        r.getMessage() for r in caplog.records if "kind=http_act" in r.getMessage() and "status=200" in r.getMessage()
    ]
    # The unread keys show in the access log (the official client's history keys are expected, not named).
    assert [line.endswith(" ignored_keys=instruction,seed") for line in served] == [False, True, True], served
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "http /act: ignoring keys instruction,seed, as the official server ignores them (said once per set of keys; "
        "the server's seed applies to every /act request)"
    ]


def test_errors_are_4xx_json_naming_the_key(official_json: None) -> None:
    good = official_request(camera_observation(1.0))
    image = good["primary_image"]
    object_array = {"__numpy__": "gAR9lC4=", "dtype": "|O", "shape": [1]}  # a pickle's bytes: never unpickled
    good_lists = {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in good.items()}
    cases: dict[str, tuple[str, int, str]] = {
        "not json": ("{nope", 400, "body"),
        "not an object": ("[1, 2]", 400, "body"),
        "nested past the parser's depth": ("[" * 100_000, 400, "body"),
        "missing image": (json_numpy.dumps(without(good, "left_wrist_image")), 422, ""),
        "misspelt key": (json_numpy.dumps(without(good, "task_description") | {"task": INSTRUCTION}), 422, ""),
        "object dtype": (json.dumps({**json.loads(json_numpy.dumps(good)), "primary_image": object_array}), 422, ""),
        "float image": (json_numpy.dumps(good | {"primary_image": image.astype(np.float32)}), 422, ""),
        "wrong image size": (json_numpy.dumps(good | {"right_wrist_image": image[:112]}), 422, ""),
        "short proprio": (json_numpy.dumps(good | {"proprio": np.zeros(7)}), 422, "proprio"),
        "NaN proprio": (json_numpy.dumps(good | {"proprio": np.full(14, np.nan)}), 422, "proprio"),
        "huge proprio": (json_numpy.dumps(good | {"proprio": np.full(14, 1e300)}), 422, "proprio"),
        "truncated array": (json_numpy.dumps(good).replace('"shape": [14]', '"shape": [15]'), 422, "proprio"),
        "unknown task": (json_numpy.dumps(good | {"task_description": "dance"}), 422, "task_description"),
        "flag not a bool": (json_numpy.dumps(good | {"return_all_query_results": "yes"}), 422, ""),
        "encoded with more": (json.dumps({"encoded": json_numpy.dumps(good), "x": 1}), 422, "encoded"),
        "encoded not text": (json.dumps({"encoded": 3}), 422, "encoded"),
        "encoded lone surrogate": ('{"encoded": "\\ud800"}', 400, "encoded"),
        "encoded holding an object": (json.dumps({"encoded": json.loads(json_numpy.dumps(good))}), 422, "encoded"),
        "a 5000-digit number": ('{"proprio": ' + "7" * 5000 + "}", 400, "body"),
        "uint8 proprio": (json_numpy.dumps(good | {"proprio": np.zeros(14, np.uint8)}), 422, "proprio"),
        "image list past 255": (json.dumps(good_lists | {"primary_image": [[[300] * 3] * 224] * 224}), 422, ""),
    }
    expected_errors = {
        "misspelt key": "task_description: missing; the request needs ['left_wrist_image', 'primary_image', 'proprio', "
        "'right_wrist_image', 'task_description']; it holds keys this server does not read: ['task']",
        "uint8 proprio": "proprio: expected dtype one of ['<f8', '<f4'], got '|u1'",
        "float image": "primary_image: expected dtype one of ['|u1'], got '<f4'",
        "image list past 255": "primary_image: expected integers in 0..255, got values in 300..300",
        "encoded holding an object": "encoded: expected json_numpy text (a JSON string holding the request), got {",
        "huge proprio": "proprio: expected values within float32's range, got 1e+300",
        "a 5000-digit number": "body: expected a JSON object, got bad text: a number too long (an integer of more than",
    }
    expected_fields = {
        "missing image": "left_wrist_image",
        "misspelt key": "task_description",
        "object dtype": "primary_image",
        "float image": "primary_image",
        "wrong image size": "right_wrist_image",
        "flag not a bool": "return_all_query_results",
        "image list past 255": "primary_image",
    }
    with serving_both(StubPolicy()) as (_, url):
        for name, (body, status, field) in cases.items():
            got_status, got = post(url + "/act", body)
            assert (got_status, got["field"]) == (status, field or expected_fields[name]), (name, got)
            assert got["error"].startswith(expected_errors.get(name, got["field"] + ": ")) and got["code"], (name, got)
        response = requests.get(url + "/act", timeout=TIMEOUT_S)  # wrong method, still JSON
        assert (response.status_code, response.json()["field"]) == (405, "method")
        response = requests.get(url + "/nowhere", timeout=TIMEOUT_S)
        assert (response.status_code, response.json()["field"]) == (404, "path")
        # After all that, the official request still works.
        assert np.asarray(get_action_from_server(good, url + "/act")["actions"]).shape == (50, 14)


def test_refusals_are_logged_once_per_client_address_per_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An hour's window, so that all the requests fall in the first whatever the machine's speed.
    monkeypatch.setattr(http_server, "RateLimitedLog", functools.partial(RateLimitedLog, interval_s=3600.0))
    with serving_both(StubPolicy()) as (_, url), requests.Session() as session:
        with caplog.at_level(logging.INFO):
            statuses = [session.post(url + "/act", data="{nope", timeout=TIMEOUT_S).status_code for _ in range(30)]
            statuses += [requests.post(url + "/act", data="[1]", timeout=TIMEOUT_S).status_code for _ in range(5)]
        good = json_numpy.dumps(official_request(camera_observation(1.0)))
        assert session.post(url + "/act", data=good, timeout=TIMEOUT_S).status_code == 200
    assert statuses == [400] * 35  # every bad request is answered
    refusals = [r for r in caplog.records if "kind=http_act" in r.getMessage() and "status=400" in r.getMessage()]
    assert len(refusals) == 1  # new connections from the same address count as the same client


def test_clients_that_leave_mid_body_are_refusals_not_tracebacks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(http_server, "RateLimitedLog", functools.partial(RateLimitedLog, interval_s=3600.0))
    with serving_both(StubPolicy()) as (_, url), caplog.at_level(logging.INFO):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        head = f"POST /act HTTP/1.1\r\nHost: {host}\r\nContent-Length: 500000\r\n\r\n".encode()
        for _ in range(5):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as leaving:
                leaving.sendall(head + b'{"proprio":')
        good = json_numpy.dumps(official_request(camera_observation(1.0)))
        assert requests.post(url + "/act", data=good, timeout=TIMEOUT_S).status_code == 200  # after all five left
    messages = [record.getMessage() for record in caplog.records]
    assert not [record for record in caplog.records if record.exc_info], "a traceback in the log"
    left = [m for m in messages if "field=body" in m and "code=malformed" in m]
    assert len(left) == 1 and "status=client_gone" in left[0]  # rate-limited as others; no 400 was sent


def test_a_failing_policy_is_a_500_and_the_server_carries_on() -> None:
    body = json_numpy.dumps(official_request(camera_observation(1.0)))
    policy = StubPolicy(failure=RuntimeError("the GPU fell off"))
    with serving_both(policy) as (_, url):
        status, response = post(url + "/act", body)
        assert (status, response["code"], response["field"]) == (500, "internal", "")
        assert "RuntimeError" in response["error"] and "GPU" not in response["error"]  # details stay in the log
        policy.failure = None
        assert post(url + "/act", body)[0] == 200


def test_bodies_over_the_limit_are_refused(official_json: None) -> None:
    with serving_both(StubPolicy(), max_body_bytes=100_000) as (_, url):
        status, body = post(url + "/act", json_numpy.dumps(official_request(camera_observation(1.0))))
    assert (status, body["field"], body["code"]) == (413, "body", "too_large")


def test_plain_lists_are_accepted_as_the_official_server_does() -> None:
    obs = camera_observation(6.0)
    request = {key: value.tolist() for key, value in official_request(obs).items() if key != "task_description"}
    request |= {"task_description": INSTRUCTION, "return_all_query_results": None}  # null: false, as officially
    with serving_both(StubPolicy()) as (_, url):
        status, response = post(url + "/act", json.dumps(request))
    assert status == 200 and "all_actions" not in response
    actions = np.asarray([json_numpy.object_hook(row) for row in response["actions"]])
    assert_allclose(actions, expected_actions(obs.proprio), atol=1e-5)


def test_an_act_that_arrives_as_serving_begins_waits_for_it(official_json: None) -> None:
    """`serve` listens just before the server answers what was queued while the models loaded; the official client
    does not retry an `overloaded` answer, so an `/act` then waits instead."""
    obs = camera_observation(7.0)
    server = PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))
    server.start()
    waiting, wait_until_accepting = threading.Event(), server.wait_until_accepting

    def wait_seen(timeout_s: float) -> bool:
        waiting.set()
        return wait_until_accepting(timeout_s)

    server.wait_until_accepting = wait_seen  # type: ignore[method-assign]
    with HttpEndpoint(server, HttpConfig(port=0)) as endpoint, ThreadPoolExecutor(1) as pool:
        reply = pool.submit(get_action_from_server, official_request(obs), endpoint.url + "/act")
        assert waiting.wait(TIMEOUT_S)  # the request is in, waiting for serving to begin
        assert not reply.done()
        with serving(server):
            assert_allclose(np.asarray(reply.result(TIMEOUT_S)["actions"]), expected_actions(obs.proprio), atol=1e-5)


def test_bodies_are_parsed_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed JSON takes many times the body's size: the bodies of all open connections must not expand at once."""
    parsing, most = 0, 0
    lock = threading.Lock()
    meeting = threading.Barrier(2)  # two parses at once would meet here

    def parse_holding(*args: Any) -> Any:
        nonlocal parsing, most
        with lock:
            parsing += 1
            most = max(most, parsing)
        with contextlib.suppress(threading.BrokenBarrierError):  # alone: broken after the wait, for every later parse
            meeting.wait(timeout=2.0)
        with lock:
            parsing -= 1
        return parse_query(*args)

    parse_query = http_server.parse_query
    monkeypatch.setattr(http_server, "parse_query", parse_holding)
    lists = {
        key: value.tolist()
        for key, value in official_request(camera_observation(8.0)).items()
        if key != "task_description"
    }
    body = json.dumps(lists | {"task_description": INSTRUCTION})
    with serving_both(StubPolicy()) as (_, url), ThreadPoolExecutor(3) as pool:
        statuses = [status for status, _ in pool.map(lambda _: post(url + "/act", body), range(3))]
    assert statuses == [200, 200, 200]
    assert most == 1 and meeting.broken  # every parse alone


def test_max_connections_are_served_at_once_and_one_more_is_refused() -> None:
    with serving_both(StubPolicy(), max_connections=2) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))):  # open, idle: one of the two
            time.sleep(0.3)  # accepted by the event loop
            assert requests.get(url + "/healthz", timeout=TIMEOUT_S).status_code == 200  # the second
            with socket.create_connection((host, int(port))):
                time.sleep(0.3)
                refused = requests.get(url + "/healthz", timeout=TIMEOUT_S)
    assert (refused.status_code, refused.text) == (503, "Service Unavailable")


def closed_by_the_server(connection: socket.socket) -> bool:
    connection.settimeout(TIMEOUT_S)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:  # closed with bytes it had not read
        return True


def test_connections_without_a_whole_request_in_time_are_closed_and_free_their_places(official_json: None) -> None:
    body = json_numpy.dumps(official_request(camera_observation(1.0)))
    # An inference longer than the deadline: a request received whole is never cut.
    # Seconds, not tenths: the check that both places are held must come before the deadline on a loaded machine.
    with serving_both(StubPolicy(delay_s=2.5), max_connections=2, request_read_timeout_s=2.0) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as idle, socket.create_connection((host, int(port))) as half:
            half.sendall(b"POST /act HTTP/1.1\r\nHost: robot\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.3)  # both accepted by the event loop
            assert requests.get(url + "/healthz", timeout=TIMEOUT_S).status_code == 503  # both places held
            assert closed_by_the_server(idle) and closed_by_the_server(half)
        assert requests.get(url + "/healthz", timeout=TIMEOUT_S).status_code == 200
        status, reply = post(url + "/act", body)
    assert status == 200 and np.asarray(reply["actions"]).shape == (50, 14)


def test_healthz_and_metadata() -> None:
    server = PolicyServer({"reactive": StubPolicy(), "planning": StubPolicy()}, ServerConfig("tcp://127.0.0.1:*"))
    with HttpEndpoint(server, HttpConfig(port=0)) as endpoint:
        before = requests.get(endpoint.url + "/healthz", timeout=TIMEOUT_S)
        with serving(server) as zmq_endpoint:
            health = requests.get(endpoint.url + "/healthz", timeout=TIMEOUT_S)
            metadata = requests.get(endpoint.url + "/metadata", timeout=TIMEOUT_S).json()
    assert (before.status_code, before.json()["status"]) == (503, "not serving")
    assert (health.status_code, health.json()["status"], health.json()["mode"]) == (200, "ok", "reactive")
    assert (metadata["platform"], metadata["mode"], metadata["instructions"]) == ("aloha", "reactive", [INSTRUCTION])
    assert metadata["modes"] == ["reactive", "planning"] and metadata["image_size"] == [224, 224]
    assert metadata["endpoints"]["http"]["cameras"] == OFFICIAL_KEYS
    assert metadata["endpoints"]["zeromq"] == {"endpoint": zmq_endpoint, "protocol_version": 1}


def test_metadata_names_no_zeromq_endpoint_when_it_is_in_process_only() -> None:
    server = PolicyServer(StubPolicy(), ServerConfig("inproc://no-zeromq-endpoint"))
    with HttpEndpoint(server, HttpConfig(port=0)) as endpoint, serving(server):
        metadata = requests.get(endpoint.url + "/metadata", timeout=TIMEOUT_S).json()
    assert metadata["endpoints"]["zeromq"] is None and metadata["endpoints"]["http"]["url"] == endpoint.url


def test_a_request_answered_shutting_down_as_the_window_ends_is_written_without_an_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()  # the inference outlives the shutdown window
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*", shutdown_timeout_s=1.0))
    endpoint = HttpEndpoint(server, HttpConfig(port=0, shutdown_timeout_s=1.0))  # a whole second: no rounding up
    url = endpoint.start()
    serving_thread = threading.Thread(target=server.serve_forever)
    serving_thread.start()
    with ThreadPoolExecutor(1) as pool:
        posted = pool.submit(post, url + "/act", json_numpy.dumps(official_request(camera_observation(1.0))))
        assert policy.started.wait(TIMEOUT_S)
        server.stop()  # as the signal handler of `serve` does
        endpoint.request_stop()
        serving_thread.join(TIMEOUT_S)
        endpoint.stop()
        status, reply = posted.result(TIMEOUT_S)
    gate.set()
    assert (status, reply["code"]) == (503, "shutting_down")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


@contextmanager
def body_arriving(window_s: float) -> Iterator[tuple[PolicyServer, Any, socket.socket]]:
    """A serving server and its endpoint, with `window_s` to shut down, and the connection of a request whose body is
    still arriving (a slow client) when the block runs; both stopped after it."""
    server = PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*", shutdown_timeout_s=window_s))
    endpoint = HttpEndpoint(server, HttpConfig(port=0, shutdown_timeout_s=window_s))
    url = endpoint.start()
    serving_thread = threading.Thread(target=server.serve_forever)
    serving_thread.start()
    host, port = parse_address(url.removeprefix("http://"))
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as slow:
            slow.sendall(b"POST /act HTTP/1.1\r\nHost: robot\r\nContent-Length: 100000\r\n\r\n{")
            time.sleep(0.3)  # the request taken in, its body arriving
            yield server, endpoint, slow
    finally:
        server.stop(now=True)
        endpoint.stop()
        serving_thread.join(TIMEOUT_S)


def test_a_second_stop_answers_a_body_still_arriving_at_once(caplog: pytest.LogCaptureFixture) -> None:
    window_s = 60.0
    with body_arriving(window_s) as (server, endpoint, slow):
        server.stop()  # as the first signal of `serve` does
        endpoint.request_stop()
        server.stop(now=True)  # and the second
        endpoint.request_stop(now=True)
        started = time.monotonic()
        endpoint.stop()
        assert time.monotonic() - started < window_s / 2
        answer = slow.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting_down" in answer
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_a_second_stop_answers_a_request_being_computed_503_at_once(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()  # the inference would outlive the window
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*", shutdown_timeout_s=60.0))
    endpoint = HttpEndpoint(server, HttpConfig(port=0, shutdown_timeout_s=60.0))
    url = endpoint.start()
    serving_thread = threading.Thread(target=server.serve_forever)
    serving_thread.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            posted = pool.submit(post, url + "/act", json_numpy.dumps(official_request(camera_observation(1.0))))
            assert policy.started.wait(TIMEOUT_S)
            for now in (False, True):  # the two signals of `serve`
                server.stop(now=now)
                endpoint.request_stop(now=now)
            status, reply = posted.result(TIMEOUT_S)
    finally:
        gate.set()
        endpoint.stop()
        serving_thread.join(TIMEOUT_S)
    assert (status, reply["code"]) == (503, "shutting_down")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_a_body_still_arriving_as_the_window_ends_is_cancelled_without_an_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with body_arriving(1.0) as (server, endpoint, _):
        server.stop()
        endpoint.request_stop()
        endpoint.stop()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text
    assert any(record.getMessage().startswith("Cancel 1 running task") for record in caplog.records)


def test_a_restart_binds_the_port_at_once_after_the_server_closed_connections() -> None:
    server = PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))
    with HttpEndpoint(server, HttpConfig(port=0)) as endpoint, serving(server):
        port = int(endpoint.url.rsplit(":", 1)[1])
        for _ in range(3):  # the server closes each connection first: its side keeps them in TIME-WAIT
            with urllib.request.urlopen(endpoint.url + "/healthz", timeout=TIMEOUT_S) as response:
                assert response.status == 200
    # `serve` restarted on the same port: it binds, loads its models, then listens (where Linux checks again).
    restarted = PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))
    listener = http_server.bind(HttpConfig(port=port))
    with HttpEndpoint(restarted, listener=listener) as endpoint, serving(restarted):
        assert requests.get(endpoint.url + "/healthz", timeout=TIMEOUT_S).status_code == 200


def test_listening_beyond_loopback_needs_the_explicit_flag() -> None:
    for host in ("0.0.0.0", "::", "192.168.1.20", "robot.lan"):
        with pytest.raises(ConfigError, match="reachable from other machines"):
            HttpConfig(host=host)
        HttpConfig(host=host, insecure_bind_all=True)
    for host in ("127.0.0.1", "localhost", "::1"):
        HttpConfig(host=host)
    assert parse_address("127.0.0.1:8777") == ("127.0.0.1", 8777)
    assert parse_address("[::1]:0") == ("::1", 0)
    for address in ("8777", "localhost", ":8777", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="http address"):
            HttpConfig(*parse_address(address))


def test_only_the_aloha_platform_has_the_official_format() -> None:
    libero = platform_spec("libero")
    with pytest.raises(ConfigError, match="ALOHA's cameras"):
        HttpEndpoint(PolicyServer(StubPolicy(platform=libero, actions_shape=(16, 7))), HttpConfig(port=0))


def test_a_bound_port_is_refused_to_a_second_server_before_either_listens() -> None:
    """`serve` binds before it loads its models and listens after: a second one must be refused at its bind."""
    first = http_server.bind(HttpConfig(port=0))
    try:
        port = first.getsockname()[1]
        with pytest.raises(ConfigError, match=f"http address: cannot listen on 127.0.0.1:{port}"):
            http_server.bind(HttpConfig(port=port)).close()
    finally:
        first.close()


def test_the_listener_names_tcp_so_replies_are_not_delayed() -> None:
    """asyncio turns TCP_NODELAY on only for connections whose listening socket names IPPROTO_TCP; without it each
    reply (header and body written apart) waits out the client's delayed ACK, about 40 ms (the HTTP row of
    benchmarks/test_transport.py measures the round trip)."""
    listener = http_server.bind(HttpConfig(port=0))
    try:
        assert listener.proto == socket.IPPROTO_TCP
    finally:
        listener.close()
