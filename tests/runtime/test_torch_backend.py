"""The torch backend's optional `torch.compile` path against eager, same weights and inputs."""

from __future__ import annotations

import gc
import itertools
import threading
import weakref
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from cosmos_edge.kernels import image_transforms as kernels
from cosmos_edge.runtime.engines import cuda_graphs, torch_networks
from cosmos_edge.runtime.engines.torch_networks import MODULATION_SETS_KEPT, TorchAutoencoder, TorchDiT
from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.models.dit import CrossAttentionKV, TimestepModulation
from cosmos_edge.runtime.models.dit_checkpoint import dit_from_state_dict, random_dit_state_dict
from cosmos_edge.runtime.models.dit_config import dit_config
from cosmos_edge.runtime.models.wan_vae import WanVAE, vae_config
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.api import StageTimer
from cosmos_edge.runtime.precision import COMPILE_SCOPES

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def test_batch_one_calls_compute_the_adaln_vectors_of_their_timesteps_once(monkeypatch: pytest.MonkeyPatch) -> None:
    config = dit_config("tiny")
    dit = dit_from_state_dict(random_dit_state_dict(config, 3))
    computed: list[float] = []
    precompute = dit.precompute_modulation

    def counted(timesteps: torch.Tensor) -> TimestepModulation:
        computed.append(float(timesteps[0, -1]))
        return precompute(timesteps)

    monkeypatch.setattr(dit, "precompute_modulation", counted)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 11, 28, 28)).astype(np.float32)
    mask = np.zeros((1, 1, 11, 28, 28), np.float32)
    mask[:, :, :5] = 1.0
    text = rng.standard_normal((1, 512, config.text_dim)).astype(np.float32)
    network = TorchDiT(dit, torch.device("cpu")).bind_text(text)
    levels = [round(0.03 * step, 2) for step in range(1, MODULATION_SETS_KEPT + 3)]  # more distinct than are kept
    with torch.inference_mode():
        kv = dit.precompute_text_kv(torch.from_numpy(text))
        for level in levels[:2] + levels[:2] + levels:
            timesteps = np.where(np.arange(11) < 5, 0.0, level).astype(np.float32)[None]
            expected = dit(*(torch.from_numpy(array) for array in (x, timesteps, mask)), kv).numpy()
            np.testing.assert_array_equal(network(x, timesteps, mask), expected)
    # Repeated timesteps reuse their vectors; beyond those kept, the least recently used are computed again.
    assert computed == pytest.approx(levels)
    computed.clear()
    for level in (levels[-1], levels[0]):
        network(x, np.where(np.arange(11) < 5, 0.0, level).astype(np.float32)[None], mask)
    assert computed == pytest.approx([levels[0]])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_dit_matches_eager(device: str) -> None:
    config = dit_config("tiny")
    dit = dit_from_state_dict(random_dit_state_dict(config, 3), device=device)
    rng = np.random.default_rng(0)
    frames = 11
    x = rng.standard_normal((1, 16, frames, 28, 28)).astype(np.float32)
    timesteps = np.where(np.arange(frames) < 5, 0.0, 0.9877).astype(np.float32)[None]
    mask = np.zeros((1, 1, frames, 28, 28), np.float32)
    mask[:, :, :5] = 1.0
    text = rng.standard_normal((1, 512, config.text_dim)).astype(np.float32)
    eager = TorchDiT(dit, torch.device(device)).bind_text(text)(x, timesteps, mask)
    compiled = TorchDiT(dit, torch.device(device), compile_mode="default").bind_text(text)(x, timesteps, mask)
    scale = np.abs(eager).max()
    assert np.abs(compiled - eager).max() / scale <= 1e-5


@pytest.mark.slow
def test_compiled_dits_on_many_devices_stay_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DiT of a process shares dynamo's per-function graph cache: per-block compilation over 8 GPUs needs more
    graphs than its default limit, past which dynamo would fall back to eager. Four dtypes stand in for devices here
    (a graph's guards tell both apart); at the limit, dynamo raises instead of falling back."""
    config = dit_config("tiny")
    weights = random_dit_state_dict(config, 4)
    rng = np.random.default_rng(1)
    text = rng.standard_normal((1, 512, config.text_dim)).astype(np.float32)
    torch._dynamo.reset()
    monkeypatch.setattr(torch_networks, "_COMPILED_DITS", itertools.count(1))  # as if these were the process's first
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
            dit = dit_from_state_dict(weights).to(dtype)
            network = TorchDiT(dit, torch.device("cpu"), "default", compile_scope="blocks").bind_text(text)
            for batch in (2, 3, 1):  # a planning device's first call is batched
                x = rng.standard_normal((batch, 16, 11, 8, 8)).astype(np.float32)
                network(x, np.full((batch, 11), 0.5, np.float32), np.zeros((batch, 1, 11, 8, 8), np.float32))


def test_an_unknown_compile_scope_is_named() -> None:
    dit = dit_from_state_dict(random_dit_state_dict(dit_config("tiny"), 4))
    with pytest.raises(ConfigError, match=r"compile_scope: expected one of \('model', 'blocks'\), got 'layers'"):
        TorchDiT(dit, torch.device("cpu"), "default", compile_scope="layers")


@pytest.mark.slow
@pytest.mark.parametrize("scope", COMPILE_SCOPES)
def test_a_compiled_dit_compiles_once_for_batch_one_and_once_for_every_larger_batch(scope: str) -> None:
    # Planning batches vary with the passes they share; a recompilation per size would take minutes each at 2B.
    # Compiled per block, the 28 blocks of a 2B DiT share these graphs: 2 in all here too.
    config = dit_config("tiny")
    weights = random_dit_state_dict(config, 4)
    rng = np.random.default_rng(1)
    text = rng.standard_normal((1, 512, config.text_dim)).astype(np.float32)
    eager = TorchDiT(dit_from_state_dict(weights), torch.device("cpu")).bind_text(text)
    torch._dynamo.reset()
    counters.clear()
    compiled_dit = TorchDiT(dit_from_state_dict(weights), torch.device("cpu"), "default", compile_scope=scope)
    compiled = compiled_dit.bind_text(text)
    for batch, level in ((1, 0.9877), (2, 0.9877), (3, 0.5), (5, 0.9877), (1, 0.5), (4, 0.25)):
        x = rng.standard_normal((batch, 16, 11, 28, 28)).astype(np.float32)
        timesteps = np.full((batch, 11), level, np.float32)
        mask = np.zeros((batch, 1, 11, 28, 28), np.float32)
        expected = eager(x, timesteps, mask)
        assert np.abs(compiled(x, timesteps, mask) - expected).max() / np.abs(expected).max() <= 1e-5
    assert counters["stats"]["unique_graphs"] == 2


def _on_a_thread_with_another_thread_count(run: Callable[[], object]) -> int:
    """Runs `run` on a new thread whose intra-op thread count differs from this one's; returns its count after (and
    restores the count, which threads started later take)."""
    threads = torch.get_num_threads()
    seen: list[int] = []
    failed: list[BaseException] = []

    def on_thread() -> None:
        torch.set_num_threads(threads + 1)
        try:
            run()
            seen.append(torch.get_num_threads())
        except BaseException as error:  # re-raised on the test's thread
            failed.append(error)
        finally:
            torch.set_num_threads(threads)

    worker = threading.Thread(target=on_thread)
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return seen[0]


@pytest.mark.slow
def test_a_network_compiled_on_one_thread_is_called_from_another_without_compiling_again() -> None:
    # Compiled graphs are guarded on the calling thread's thread count; the server's worker and the planning
    # workers call networks loaded and warmed up on the main thread.
    config = dit_config("tiny")
    rng = np.random.default_rng(1)
    text = rng.standard_normal((1, 512, config.text_dim)).astype(np.float32)
    x = rng.standard_normal((1, 16, 11, 8, 8)).astype(np.float32)
    timesteps, mask = np.full((1, 11), 0.5, np.float32), np.zeros((1, 1, 11, 8, 8), np.float32)
    torch._dynamo.reset()
    counters.clear()
    network = TorchDiT(dit_from_state_dict(random_dit_state_dict(config, 4)), torch.device("cpu"), "default")
    bound = network.bind_text(text)
    expected = bound(x, timesteps, mask)
    got = []
    count = _on_a_thread_with_another_thread_count(lambda: got.append(bound(x, timesteps, mask)))
    np.testing.assert_array_equal(got[0], expected)
    assert counters["stats"]["unique_graphs"] == 1
    assert count == torch.get_num_threads()


def test_a_camera_encode_runs_with_the_thread_count_its_network_was_opened_with() -> None:
    platform = platform_spec("aloha")
    torch.manual_seed(5)
    encoder = TorchAutoencoder(WanVAE(vae_config("tiny")), torch.device("cpu"), platform)
    images = {name: np.zeros((224, 224, 3), np.uint8) for name in platform.cameras}
    count = _on_a_thread_with_another_thread_count(lambda: encoder.encode_conditioning(images, StageTimer()))
    assert count == torch.get_num_threads()


def test_closing_a_dit_drops_the_text_kv_of_networks_a_caller_still_holds() -> None:
    config = dit_config("tiny")
    dit = TorchDiT(dit_from_state_dict(random_dit_state_dict(config, 3)), torch.device("cpu"))
    text = np.random.default_rng(0).standard_normal((1, 512, config.text_dim)).astype(np.float32)
    network = dit.bind_text(text)  # held, as a policy's TextBinding holds it
    (binding,) = dit._text_kvs
    assert binding.kv is not None
    kv = weakref.ref(binding.kv.k)
    del binding
    dit.close()
    gc.collect()
    assert kv() is None  # 117 MB per instruction for the 2B DiT in bf16
    x, mask = np.zeros((1, 16, 11, 28, 28), np.float32), np.zeros((1, 1, 11, 28, 28), np.float32)
    with pytest.raises(EngineError, match="closed with the policies that loaded it"):
        network(x, np.zeros((1, 11), np.float32), mask)


def test_an_autoencoder_closes_once_and_refuses_encodes_after() -> None:
    platform = platform_spec("aloha")
    encoder = TorchAutoencoder(WanVAE(vae_config("tiny")), torch.device("cpu"), platform)
    images = {name: np.zeros((224, 224, 3), np.uint8) for name in platform.cameras}
    encoder.encode_conditioning(images, StageTimer())
    encoder.close()
    encoder.close()  # again (a loader's cleanup after a failure, then the owner's): nothing left, no error
    with pytest.raises(EngineError, match="closed with the policies that loaded it"):
        encoder.encode_conditioning(images, StageTimer())


@pytest.mark.slow
def test_a_compiled_camera_encode_matches_eager() -> None:
    platform = platform_spec("aloha")
    torch.manual_seed(5)
    vae = WanVAE(vae_config("tiny"))
    rng = np.random.default_rng(2)
    images = {name: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for name in platform.cameras}
    eager = TorchAutoencoder(vae, torch.device("cpu"), platform).encode_conditioning(images, StageTimer())
    compiled = TorchAutoencoder(vae, torch.device("cpu"), platform, compile_mode="default")
    got = compiled.encode_conditioning(images, StageTimer())
    assert np.abs(got - eager).max() / np.abs(eager).max() <= 1e-5
    # CUDA's default: the encoder's convs as 2-D convs over stacked time taps, compiled.
    folded = TorchAutoencoder(vae, torch.device("cpu"), platform, compile_mode="default", fold_time_taps=True)
    got = folded.encode_conditioning(images, StageTimer())
    assert np.abs(got - eager).max() / np.abs(eager).max() <= 1e-5


def test_cuda_graphs_need_a_cuda_device() -> None:
    dit = dit_from_state_dict(random_dit_state_dict(dit_config("tiny"), 3))
    with pytest.raises(ConfigError, match="cuda_graphs: CUDA graphs need a CUDA device, got cpu"):
        TorchDiT(dit, torch.device("cpu"), cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_networks_on_cuda_turn_tf32_off(
    tiny_assets: dict[str, CheckpointFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tiny_assets["aloha"]
    for switch in (torch.backends.cudnn, torch.backends.cuda.matmul):  # put back after the test
        monkeypatch.setattr(switch, "allow_tf32", True)
    torch_networks.open_autoencoder(files.tokenizer, "fp32", "cuda", platform_spec("aloha")).close()
    assert not torch.backends.cudnn.allow_tf32  # the VAE's convolutions
    torch.backends.cudnn.allow_tf32 = True
    torch_networks.open_dit(files.checkpoint, "fp32", "cuda").close()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_device_is_named_with_its_index() -> None:
    # Tensors name theirs ("cuda:0"); tables cached per device are then found under one key whatever was asked.
    assert torch_networks.check_device("cuda") == torch.device("cuda", torch.cuda.current_device())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dit_calls_replayed_from_cuda_graphs_give_the_bits_of_plain_calls() -> None:
    device = torch.device("cuda")
    config = dit_config("tiny")
    dit = dit_from_state_dict(random_dit_state_dict(config, 3)).to(device)
    rng = np.random.default_rng(0)
    texts = [rng.standard_normal((1, 512, config.text_dim)).astype(np.float32) for _ in range(2)]
    graphed = TorchDiT(dit, device, cuda_graphs=True)
    replayed = [graphed.bind_text(text) for text in texts]
    assert graphed.bind_text(texts[0].copy()) is replayed[0]  # an instruction bound again keeps its K/V
    plain = [TorchDiT(dit, device).bind_text(text) for text in texts]
    mask = torch.zeros((1, 1, 11, 28, 28), device=device)
    mask[:, :, :5] = 1.0
    held = []
    # Two timesteps (two captures) and two instructions sharing them, replayed with new inputs; an earlier output
    # must survive later replays.
    for level, instruction in ((0.5, 0), (0.9877, 0), (0.5, 1), (0.5, 0), (0.9877, 1)):
        timesteps = np.where(np.arange(11) < 5, 0.0, level).astype(np.float32)[None]
        x = torch.from_numpy(rng.standard_normal((1, 16, 11, 28, 28)).astype(np.float32)).to(device)
        expected = plain[instruction](x, timesteps, mask)
        got = replayed[instruction](x, timesteps, mask)
        assert torch.equal(got, expected)
        held.append((got, expected.clone()))
    for got, expected in held:
        assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_camera_encode_replayed_from_a_cuda_graph_gives_the_bits_of_a_plain_one() -> None:
    device = torch.device("cuda")
    platform = platform_spec("aloha")
    torch.manual_seed(5)
    vae = WanVAE(vae_config("tiny")).to(device)
    plain = TorchAutoencoder(vae, device, platform)
    replayed = TorchAutoencoder(vae, device, platform, cuda_graphs=True)
    rng = np.random.default_rng(2)
    for sizes in ([(480, 640)] * 3, [(480, 640)] * 3, [(480, 640), (256, 256), (480, 640)]):
        images = {
            name: rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            for name, size in zip(platform.cameras, sizes, strict=True)
        }
        expected = plain.encode_conditioning(images, StageTimer())
        np.testing.assert_array_equal(replayed.encode_conditioning(images, StageTimer()), expected)


def test_the_captured_camera_encode_is_keyed_by_frame_sizes_and_holds_its_tables() -> None:
    # The CUDA-only route's plumbing, on the CPU: a stand-in for the captures runs what would be captured.
    platform = platform_spec("aloha")
    torch.manual_seed(5)
    encoder = TorchAutoencoder(WanVAE(vae_config("tiny")), torch.device("cpu"), platform)
    seen: list[tuple[object, int]] = []

    def run_plainly(key: object, function: Callable[..., torch.Tensor], inputs: list, holds: list) -> torch.Tensor:
        seen.append((key, len(holds)))
        return function(*inputs)

    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((480, 640, 3), (224, 224, 3), (480, 640, 3))]
    prepared = kernels.batch_frames(platform, frames)
    uploaded = [torch.from_numpy(batch) for batch in prepared.batches]
    with torch.inference_mode():
        got = encoder._replay(run_plainly, prepared, uploaded)  # type: ignore[arg-type]
        expected = encoder._encode_planes(kernels.transform_frames(platform, frames, torch.device("cpu")))
    assert torch.equal(got, expected)
    # Two sizes (the 480x640 frames batched), three frames' places; tables: the 480x640 batch's two bicubic passes (a
    # tap matrix each) and crop resize (index and weights), the 224x224 frame's crop resize (2), and the model-range
    # table listed with each size's (2).
    assert seen == [((((2, 480, 640, 3), (1, 224, 224, 3)), ((0, 0), (1, 0), (0, 1))), 8)]


def test_closing_an_autoencoder_keeps_the_tables_another_captures_from() -> None:
    platform, cpu = platform_spec("aloha"), torch.device("cpu")
    closing = TorchAutoencoder(WanVAE(vae_config("tiny")), cpu, platform)
    shape = (1, 480, 640, 3)
    held = kernels.device_tables(platform, shape, cpu)  # what another autoencoder's capture would hold
    closing.close()
    again = kernels.device_tables(platform, shape, cpu)  # what that capture reads while it records
    assert all(a is b for a, b in zip(again, held, strict=True))


def test_batch_one_dit_calls_of_every_instruction_share_the_captures_of_their_timesteps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CUDA-only route's plumbing, on the CPU: stand-ins for the pool and the captures. A stand-in keeps the first
    # function given for a key and runs it for every later call with that key, as a replayed graph would.
    keys: list[tuple[object, ...]] = []

    class ReplayFirst:
        def __init__(self, limit: int, pool: object) -> None:
            assert (limit, pool) == (MODULATION_SETS_KEPT, "pool")
            self.captured: dict[tuple[object, ...], Callable[..., torch.Tensor]] = {}

        def __call__(
            self, key: tuple[object, ...], function: Callable[..., torch.Tensor], inputs: list
        ) -> torch.Tensor:
            keys.append(key)
            return self.captured.setdefault(key, function)(*inputs)

        def replay(self, key: tuple[object, ...], inputs: list) -> torch.Tensor | None:
            if key not in self.captured:
                return None
            keys.append(key)
            return self.captured[key](*inputs)

        def captures(self, key: tuple[object, ...]) -> bool:
            return key in self.captured

    monkeypatch.setattr(torch_networks, "graph_pool", lambda device: "pool")
    monkeypatch.setattr(torch_networks, "CapturedCalls", ReplayFirst)
    config = dit_config("tiny")
    dit = dit_from_state_dict(random_dit_state_dict(config, 3))
    rng = np.random.default_rng(0)
    texts = [rng.standard_normal((1, 512, config.text_dim)).astype(np.float32) for _ in range(6)]
    graphed = TorchDiT(dit, torch.device("cpu"), cuda_graphs=True)
    first = graphed.bind_text(texts[0])
    assert graphed.bind_text(texts[0].copy()) is first  # bound again: the same network, with its K/V
    for text in texts[1:]:
        graphed.bind_text(text)
    assert graphed.bind_text(texts[0]) is not first  # only the last 4 instructions are kept
    x = torch.from_numpy(rng.standard_normal((1, 16, 11, 28, 28)).astype(np.float32))
    mask = torch.zeros((1, 1, 11, 28, 28))
    mask[:, :, :5] = 1.0
    timesteps = np.where(np.arange(11) < 5, 0.0, 0.9877).astype(np.float32)[None]
    plain = TorchDiT(dit, torch.device("cpu"))
    # Instructions alternating over one capture: each call reads its own instruction's K/V.
    for text in (texts[0], texts[1], texts[1], texts[0]):
        expected = plain.bind_text(text)(x, timesteps, mask)
        assert torch.equal(graphed.bind_text(text)(x, timesteps, mask), expected)
    kv_shape = (config.num_blocks, 1, config.num_heads, 512, config.head_dim)
    assert set(keys) == {(timesteps.tobytes(), (1, 16, 11, 28, 28), (1, 1, 11, 28, 28), kv_shape)}
    # Larger batches (planning's) are not captured, and read their own instruction's K/V, not the buffers'.
    batch = (torch.cat([x, x]), np.concatenate([timesteps] * 2), mask.repeat(2, 1, 1, 1, 1))
    assert torch.equal(graphed.bind_text(texts[1])(*batch), plain.bind_text(texts[1])(*batch))
    assert len(keys) == 4


def test_replayed_calls_look_up_no_adaln_vectors_and_keep_theirs_in_the_capture_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real CapturedCalls over a stand-in capture that reruns its first function on fixed buffers, as a replay does.
    class Replaying:
        def __init__(self, function: Callable[..., torch.Tensor], inputs: list, pool: object, holds: object) -> None:
            self.function, self.inputs = function, [tensor.clone() for tensor in inputs]
            self.function(*self.inputs)

        def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
            for kept, given in zip(self.inputs, inputs, strict=True):
                kept.copy_(given)
            return self.function(*self.inputs)

    monkeypatch.setattr(torch_networks, "graph_pool", lambda device: "pool")
    monkeypatch.setattr(cuda_graphs, "CapturedCall", Replaying)
    config = dit_config("tiny")
    dit = dit_from_state_dict(random_dit_state_dict(config, 3))
    computed: list[object] = []
    precompute = dit.precompute_modulation
    monkeypatch.setattr(dit, "precompute_modulation", lambda steps: computed.append(steps) or precompute(steps))
    graphed, plain = TorchDiT(dit, torch.device("cpu"), cuda_graphs=True), TorchDiT(dit, torch.device("cpu"))
    text = np.random.default_rng(0).standard_normal((1, 512, config.text_dim)).astype(np.float32)
    network, reference = graphed.bind_text(text), plain.bind_text(text)
    x, mask = torch.zeros((1, 16, 11, 8, 8)), torch.zeros((1, 1, 11, 8, 8))
    levels = [np.where(np.arange(11) < 5, 0.0, 0.5 + 0.01 * i).astype(np.float32)[None] for i in range(30)]
    for query in range(2):  # a 30-step query: 24 timesteps captured, 6 more run plainly
        computed.clear()
        for steps in levels:
            assert torch.equal(network(x, steps, mask), reference(x, steps, mask))
        assert len(computed) == (30 + 30 if query == 0 else 30)  # the plain network's 30; then the graphed none
    assert len(graphed._modulations) == 6  # the captured timesteps' vectors live in their captures only


def test_the_captures_keep_no_instruction_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    # 117 MB of K/V per instruction for the 2B DiT in bf16: a capture must hold the shared buffers, not its own.
    class KeepFunctions:
        def __init__(self, limit: int, pool: object) -> None:
            self.functions: dict[object, Callable[..., torch.Tensor]] = {}

        def __call__(self, key: object, function: Callable[..., torch.Tensor], inputs: list) -> torch.Tensor:
            return self.functions.setdefault(key, function)(*inputs)

        def replay(self, key: object, inputs: list) -> torch.Tensor | None:
            return self.functions[key](*inputs) if key in self.functions else None

        def captures(self, key: object) -> bool:
            return key in self.functions

    monkeypatch.setattr(torch_networks, "graph_pool", lambda device: "pool")
    monkeypatch.setattr(torch_networks, "CapturedCalls", KeepFunctions)
    config = dit_config("tiny")
    dit = dit_from_state_dict(random_dit_state_dict(config, 3))
    made: list[weakref.ref[torch.Tensor]] = []
    precompute = dit.precompute_text_kv

    def tracked(text: torch.Tensor) -> CrossAttentionKV:
        kv = precompute(text)
        made.append(weakref.ref(kv.k))
        return kv

    monkeypatch.setattr(dit, "precompute_text_kv", tracked)
    graphed = TorchDiT(dit, torch.device("cpu"), cuda_graphs=True)
    rng = np.random.default_rng(0)
    x, mask = torch.zeros((1, 16, 11, 8, 8)), torch.zeros((1, 1, 11, 8, 8))
    for _ in range(6):  # the first instruction captures; 5 more evict it from the 4 bindings kept
        text = rng.standard_normal((1, 512, config.text_dim)).astype(np.float32)
        graphed.bind_text(text)(x, np.full((1, 11), 0.5, np.float32), mask)
    gc.collect()
    assert made[0]() is None
