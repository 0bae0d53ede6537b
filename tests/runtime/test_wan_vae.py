"""Parity of the static Wan VAE with diffusers' `AutoencoderKLWan`, which runs the official chunked algorithm
(frame 0, then 4-frame chunks with feature caches; decode one latent frame at a time)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.models.prefix_encoder import BlackPrefixEncoder
from cosmos_edge.runtime.models.vae_checkpoint import random_vae_state_dict
from cosmos_edge.runtime.models.wan_vae import LATENT_MEAN, LATENT_STD, WanVAE, WanVAEConfig, vae_config
from cosmos_edge.runtime.platforms import platform_spec
from tests.helpers.vae_layout import to_diffusers_layout

diffusers_wan = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")

TINY = vae_config("tiny")
# Clips of 1 + 4k frames: a lone first frame, one chunk, several chunks, and the ALOHA/RoboCasa length (LIBERO: 33).
FRAME_COUNTS = [1, 5, 17, 41]
REL_TOL = 1e-5  # max|ours - ref| / max|ref| in fp32


def _models(dtype: torch.dtype) -> tuple[WanVAE, nn.Module]:
    weights = random_vae_state_dict(TINY, seed=0, dtype=dtype)
    ours = WanVAE(TINY).to(dtype).eval()
    ours.load_state_dict(weights)
    ref = diffusers_wan.AutoencoderKLWan(
        base_dim=TINY.base_dim,
        z_dim=TINY.z_dim,
        dim_mult=list(TINY.dim_mult),
        num_res_blocks=TINY.num_res_blocks,
        temperal_downsample=list(TINY.temporal_downsample),
    )
    ref.load_state_dict(to_diffusers_layout(weights, TINY), strict=True)
    return ours.requires_grad_(False), ref.to(dtype).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models() -> tuple[WanVAE, nn.Module]:
    return _models(torch.float32)


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    # Same construction as WanVAE's buffers: fp32 constants cast to the model dtype.
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1).to(like.dtype) for v in (LATENT_MEAN, LATENT_STD))
    return mean, std


def test_the_latent_statistics_are_those_of_the_diffusers_wan_vae() -> None:
    # The reference encode and decode below normalise with the code's own constants: these are checked on their own.
    defaults = inspect.signature(diffusers_wan.AutoencoderKLWan.__init__).parameters
    assert list(LATENT_MEAN) == defaults["latents_mean"].default
    assert list(LATENT_STD) == defaults["latents_std"].default


def ref_encode(ref: nn.Module, video: Tensor) -> Tensor:
    mean, std = _stats(video)
    return (ref.encode(video).latent_dist.mode() - mean) * std.reciprocal()


def ref_decode(ref: nn.Module, latent: Tensor) -> Tensor:
    mean, std = _stats(latent)
    return ref.decode(latent / std.reciprocal() + mean).sample


def _video(frames: int, size: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator().manual_seed(frames * 1000 + size)
    return (torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1).to(dtype)


def _latent(frames: int, size: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator().manual_seed(frames * 1000 + size + 1)
    return torch.randn(batch, TINY.z_dim, frames, size, size, generator=generator).to(dtype)


def _rel_err(ours: Tensor, ref: Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_encode_matches_diffusers(models: tuple[WanVAE, nn.Module], frames: int) -> None:
    ours, ref = models
    video = _video(frames, 32, batch=2 if frames == 5 else 1)
    with torch.inference_mode():
        latent, expected = ours.encode(video), ref_encode(ref, video)
    assert latent.shape == (video.shape[0], 16, 1 + (frames - 1) // 4, 4, 4)
    assert _rel_err(latent, expected) <= REL_TOL


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_decode_matches_diffusers(models: tuple[WanVAE, nn.Module], frames: int) -> None:
    ours, ref = models
    latent = _latent(1 + (frames - 1) // 4, 4, batch=2 if frames == 5 else 1)
    with torch.inference_mode():
        video, expected = ours.decode(latent), ref_decode(ref, latent)
    assert video.shape == (latent.shape[0], 3, frames, 32, 32)
    assert video.abs().max() <= 1.0
    assert (video.abs() < 1.0).float().mean() > 0.9, "random weights should keep the clamp mostly inactive"
    assert _rel_err(video, expected) <= REL_TOL


def test_round_trip_matches_diffusers_at_64_pixels(models: tuple[WanVAE, nn.Module]) -> None:
    ours, ref = models
    video = _video(5, 64)
    with torch.inference_mode():
        latent, expected_latent = ours.encode(video), ref_encode(ref, video)
        decoded, expected_video = ours.decode(latent), ref_decode(ref, expected_latent)
    assert _rel_err(latent, expected_latent) <= REL_TOL
    assert _rel_err(decoded, expected_video) <= REL_TOL


@pytest.mark.slow
def test_round_trip_matches_diffusers_at_policy_resolution(models: tuple[WanVAE, nn.Module]) -> None:
    ours, ref = models
    video = _video(5, 224)
    with torch.inference_mode():
        latent, expected_latent = ours.encode(video), ref_encode(ref, video)
        decoded, expected_video = ours.decode(latent), ref_decode(ref, expected_latent)
    assert latent.shape == (1, 16, 2, 28, 28)
    assert _rel_err(latent, expected_latent) <= REL_TOL
    assert _rel_err(decoded, expected_video) <= REL_TOL


def test_float64_equals_chunked_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    # In float64 the two computations agree to rounding noise, which shows they are the same function, not close ones.
    # diffusers' upsample rounds through fp32 (a bf16 workaround, a no-op in fp32 and below); turned off here.
    monkeypatch.setattr(diffusers_wan.WanUpsample, "forward", nn.Upsample.forward)
    ours, ref = _models(torch.float64)
    # 9 frames / 3 latents: the first chunk, a full chunk, and one that reads the caches the full chunk left.
    video, latent = _video(9, 32, dtype=torch.float64), _latent(3, 4, dtype=torch.float64)
    with torch.inference_mode():
        assert _rel_err(ours.encode(video), ref_encode(ref, video)) <= 1e-12
        assert _rel_err(ours.decode(latent), ref_decode(ref, latent)) <= 1e-12


def test_encoder_and_decoder_are_causal(models: tuple[WanVAE, nn.Module]) -> None:
    ours, _ = models
    video, latent = _video(41, 32), _latent(11, 4)
    with torch.inference_mode():
        torch.testing.assert_close(ours.encode(video[:, :, :17]), ours.encode(video)[:, :, :5], rtol=0, atol=1e-6)
        # Decoded pixels are O(1) and pass through ~3x more layers: rounding noise of differently shaped convs.
        assert _rel_err(ours.decode(latent[:, :, :5]), ours.decode(latent)[:, :, :17]) <= REL_TOL


class _Call(nn.Module):
    """Exposes one method of the VAE as `forward`, the entry point exporters trace."""

    def __init__(self, vae: WanVAE, method: str) -> None:
        super().__init__()
        self.vae, self.method = vae, method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.vae, self.method)(x)


def test_encode_is_one_static_graph(models: tuple[WanVAE, nn.Module]) -> None:
    ours, _ = models
    video = _video(17, 32)
    with torch.no_grad():
        exported = torch.export.export(_Call(ours, "encode"), (video,))  # fails on data-dependent control flow
        torch.testing.assert_close(exported.module()(video), ours.encode(video), rtol=0, atol=0)


def test_decode_exports_to_onnx(models: tuple[WanVAE, nn.Module], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    ours, _ = models
    latent = _latent(3, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the shape checks, which are constant per export
        torch.onnx.export(_Call(ours, "decode"), (latent,), tmp_path / "decode.onnx", dynamo=False, opset_version=17)
        expected = ours.decode(latent)
    session = ort.InferenceSession(tmp_path / "decode.onnx")
    (video,) = session.run(None, {session.get_inputs()[0].name: latent.numpy()})
    assert _rel_err(torch.from_numpy(video), expected) <= REL_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latent_statistics_round_like_the_official_wrapper(dtype: torch.dtype) -> None:
    # The official wrapper builds mean/std straight from Python floats in the VAE dtype; ours casts fp32 buffers.
    model = WanVAE(TINY).to(dtype)
    assert torch.equal(model.latent_mean.flatten(), torch.tensor(LATENT_MEAN, dtype=dtype))
    assert torch.equal(model.latent_std.flatten(), torch.tensor(LATENT_STD, dtype=dtype))


def test_half_precision_runs_close_to_fp32(models: tuple[WanVAE, nn.Module]) -> None:
    ours, _ = models
    half = WanVAE(TINY).to(torch.bfloat16).eval()
    half.load_state_dict(ours.state_dict())
    video = _video(5, 16)
    with torch.inference_mode():
        latent = half.encode(video.to(torch.bfloat16))
        assert latent.dtype == torch.bfloat16
        assert _rel_err(latent.float(), ours.encode(video)) < 0.05


def test_wan21_preset_has_the_official_parameter_count() -> None:
    with torch.device("meta"):
        ours = WanVAE(vae_config("wan2.1"))
        ref = diffusers_wan.AutoencoderKLWan()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 126_892_531


def test_presets_and_validation() -> None:
    assert vae_config("wan2.1") == WanVAEConfig(base_dim=96)
    assert vae_config("tiny").spatial_factor == 8
    with pytest.raises(ConfigError, match=r"one of \['tiny', 'wan2.1'\], got 'wan2'"):
        vae_config("wan2")
    with pytest.raises(ConfigError, match=r"z_dim: expected 16"):
        WanVAEConfig(base_dim=8, z_dim=4)
    with pytest.raises(ConfigError, match=r"temporal_downsample: expected 3 bools"):
        WanVAEConfig(base_dim=8, temporal_downsample=(True, True))
    with pytest.raises(ConfigError, match=r"temporal_downsample: expected exactly two temporal stages"):
        WanVAEConfig(base_dim=8, temporal_downsample=(False, False, True))
    with pytest.raises(ConfigError, match=r"base_dim: expected a positive int, got 0"):
        WanVAEConfig(base_dim=0)
    assert WanVAEConfig(base_dim=8, dim_mult=[1, 2, 4, 4]).dim_mult == (1, 2, 4, 4)


def test_bad_inputs_are_named(models: tuple[WanVAE, nn.Module]) -> None:
    ours, _ = models
    with pytest.raises(InputError, match=r"1\+4k"):
        ours.encode(_video(4, 32))
    with pytest.raises(InputError, match=r"divisible by 8"):
        ours.encode(_video(5, 36))
    with pytest.raises(InputError, match=r"expected dtype torch.float32"):
        ours.encode(_video(5, 32, dtype=torch.float64))
    with pytest.raises(InputError, match=r"expected shape \[B, 16, T, H, W\]"):
        ours.decode(torch.zeros(1, 8, 2, 4, 4))


@pytest.mark.parametrize("prefix_frames", [1, 5])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.0), (torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_a_continuation_after_the_encoded_prefix_gives_the_whole_clips_latents(
    dtype: torch.dtype, tolerance: float, prefix_frames: int
) -> None:
    """Also after a prefix shorter than a conv's 2-frame window, whose zero padding the context keeps."""
    vae = WanVAE(TINY)
    vae.load_state_dict(random_vae_state_dict(TINY, seed=3))
    vae = vae.to(dtype).eval()
    generator = torch.Generator().manual_seed(0)
    clip = (torch.rand(1, 3, 17, 32, 32, generator=generator) * 2 - 1).to(dtype)
    clip[:, :, :5] = -1.0  # the black frames of the blank and proprio slots
    with torch.no_grad():
        whole = vae.encode(clip)
        prefix, context = vae.encode_prefix(clip[:, :, :prefix_frames])
        continuation = vae.encode_continuation(clip[:, :, prefix_frames:], context)
        batch = vae.encode_continuation(clip[:, :, prefix_frames:].expand(2, -1, -1, -1, -1), context)
    torch.testing.assert_close(torch.cat([prefix, continuation], 2).double(), whole.double(), rtol=0, atol=tolerance)
    assert torch.equal(batch[0], batch[1])
    with pytest.raises(InputError, match="multiple of 4 frames"):
        vae.encode_continuation(clip[:, :, 5:15], context)


def test_the_black_prefix_encoder_takes_a_batch_of_camera_clips() -> None:
    vae = WanVAE(TINY)
    vae.load_state_dict(random_vae_state_dict(TINY, seed=3))
    encoder = BlackPrefixEncoder(vae.eval(), platform_spec("libero"))
    cameras = torch.rand(2, 3, 8, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        batch = encoder(cameras)
        one = encoder(cameras[1:])
    assert batch.shape[0] == 2
    torch.testing.assert_close(batch[1:], one, rtol=0, atol=1e-5)  # float32: batched convs sum in another order


@pytest.mark.parametrize("prefix_frames", [1, 5])
@pytest.mark.parametrize("frames", [17, 41])
def test_a_folding_continuation_matches_diffusers(
    models: tuple[WanVAE, nn.Module], frames: int, prefix_frames: int
) -> None:
    ours, ref = models
    video = _video(frames, 32)
    with torch.inference_mode():
        expected = ref_encode(ref, video)
        prefix, context = ours.encode_prefix(video[:, :, :prefix_frames], fold_time_taps=True)
        rest = video[:, :, prefix_frames:].expand(2, -1, -1, -1, -1)  # batch 2 after the batch-1 prefix
        continuation = ours.encode_continuation(rest, context)
        whole = ours.encode(video)  # the whole-clip encode is never folded
    assert _rel_err(torch.cat([prefix, continuation[:1]], 2), expected) <= REL_TOL
    assert torch.equal(continuation[0], continuation[1])
    assert _rel_err(whole, expected) <= REL_TOL


def test_a_folding_continuation_in_bf16_stays_as_close_to_fp32_as_the_3d_convs() -> None:
    """The folded convs sum the same products in another order, and both round each layer's output to bf16: over
    several weights and clips their error against fp32 is that of the 3-D convs (means and 99th percentiles within
    5%)."""
    errors: dict[bool, list[Tensor]] = {False: [], True: []}
    for weights_seed in range(3):
        exact = WanVAE(TINY).eval()
        exact.load_state_dict(random_vae_state_dict(TINY, seed=weights_seed))
        half = WanVAE(TINY).to(torch.bfloat16).eval()
        half.load_state_dict(exact.state_dict())
        with torch.inference_mode():
            for size in (40, 48):
                video = _video(17, size)
                expected = exact.encode(video)[:, :, 2:]
                clip = video.to(torch.bfloat16)
                for fold in (False, True):
                    _, context = half.encode_prefix(clip[:, :, :5], fold_time_taps=fold)
                    latent = half.encode_continuation(clip[:, :, 5:], context)
                    errors[fold].append((latent.float() - expected).abs())
    mean = {fold: sum(e.mean().item() for e in errors[fold]) for fold in errors}
    tail = {fold: sum(e.flatten().quantile(0.99).item() for e in errors[fold]) for fold in errors}
    assert mean[True] <= 1.05 * mean[False]
    assert tail[True] <= 1.05 * tail[False]
