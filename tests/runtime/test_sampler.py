import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest

from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from cosmos_edge.runtime.policy.api import MAX_SEED
from cosmos_edge.runtime.policy.numerics import round_to_bf16
from cosmos_edge.runtime.policy.sampler import (
    DenoiseCondition,
    Denoiser,
    SigmaScale,
    evaluation_sigmas,
    initial_noise,
    karras_sigmas,
    res_ab2_step,
    sample,
    variance_scale,
    x0_euler_step,
)

SHAPE = (16, 5, 4, 4)  # c t h w: tiny but with the real channel count
CLEAN_FRAMES = (0, 1)


def _mask(clean_frames: tuple[int, ...] = CLEAN_FRAMES, frames: int = SHAPE[1]) -> np.ndarray:
    mask = np.zeros((1, 1, frames, 1, 1), dtype=np.float32)
    mask[0, 0, list(clean_frames)] = 1.0
    return mask


def _clean(batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *SHAPE)).astype(np.float32)


def _t32(sigma: float) -> np.float32:
    sigma32 = np.float32(sigma)
    return sigma32 / (sigma32 + np.float32(1.0))


def _bf16(value: np.float32) -> np.float32:
    return round_to_bf16(np.array([value], dtype=np.float32))[0]


def _linear_net(scale: float = 0.3):
    def net(x_in: np.ndarray, timesteps: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.float32(scale) * x_in

    return net


# --- schedule and step-count rule ---------------------------------------------------------------------------------


def test_karras_sigmas_run_from_max_to_min() -> None:
    sigmas = karras_sigmas(6)
    assert sigmas.dtype == np.float64 and sigmas.shape == (7,)
    assert sigmas[0] == pytest.approx(80.0, abs=1e-12) and sigmas[-1] == pytest.approx(4.0, abs=1e-12)
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_one_and_two_steps_are_one_call_at_sigma_max(num_steps: int) -> None:
    sigmas = evaluation_sigmas(num_steps)
    assert sigmas.shape == (1,) and np.float32(sigmas[0]) == np.float32(80.0)


@pytest.mark.parametrize("num_steps", [3, 5, 10])
def test_evaluation_sigmas_for_three_or_more_steps_are_karras_over_one_interval_fewer(num_steps: int) -> None:
    index = np.arange(num_steps, dtype=np.float64)  # n steps evaluate n sigmas: n - 1 intervals, 80 down to 4
    expected = (80 ** (1 / 7) + index / (num_steps - 1) * (4 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(evaluation_sigmas(num_steps), expected, rtol=4e-16, atol=0)


def test_step_count_below_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match="num_steps"):
        evaluation_sigmas(0)


def test_karras_sigmas_match_torch_formula_to_an_ulp() -> None:
    torch = pytest.importorskip("torch")
    for intervals in range(1, 12):
        index = torch.arange(intervals + 1, dtype=torch.float64)
        expected = (80 ** (1 / 7) + index / intervals * (4 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        np.testing.assert_allclose(karras_sigmas(intervals), expected.numpy(), rtol=4e-16, atol=0)


# --- initial noise ------------------------------------------------------------------------------------------------


def test_initial_noise_is_random_state_draw_times_80() -> None:
    noise = initial_noise(195, (1, *SHAPE))
    expected = np.random.RandomState(195).standard_normal((1, *SHAPE)).astype(np.float32) * np.float32(80)
    assert noise.dtype == np.float32
    np.testing.assert_array_equal(noise, expected)


def test_initial_noise_rejects_out_of_range_seed() -> None:
    assert initial_noise(MAX_SEED, SHAPE).shape == SHAPE
    for seed in (-1, MAX_SEED + 1):  # planning's s + i can pass the top
        with pytest.raises(InputError, match=f"seed: expected an integer in 0..{MAX_SEED}, got {seed}") as caught:
            initial_noise(seed, SHAPE)
        assert caught.value.field == "seed"


# --- solver steps against the formulas of the reference notes -----------------------------------------------------


def test_euler_step_is_x0_form_interpolation() -> None:
    rng = np.random.default_rng(1)
    x, x0 = rng.standard_normal((2, 50))
    ratio = 42.29 / 80.0
    np.testing.assert_allclose(x0_euler_step(x, x0, 80.0, 42.29), ratio * x + (1 - ratio) * x0, rtol=1e-14)


def _ab2_reference(x, x0, x0_prev, sigma, sigma_next, sigma_prev):
    h = np.log(sigma / sigma_next)
    c2 = (np.log(sigma) - np.log(sigma_prev)) / h
    phi1 = (np.exp(-h) - 1) / -h
    phi2 = (phi1 - 1) / -h
    b1, b2 = phi1 - phi2 / c2, phi2 / c2
    return np.exp(-h) * x + h * (b1 * x0 + b2 * x0_prev)


@pytest.mark.parametrize(("sigma_prev", "sigma", "sigma_next"), [(80.0, 42.29, 20.97), (9.62, 5.99, 4.0)])
def test_ab2_step_matches_reference_formula(sigma_prev: float, sigma: float, sigma_next: float) -> None:
    rng = np.random.default_rng(2)
    x, x0, x0_prev = rng.standard_normal((3, 50))
    np.testing.assert_allclose(
        res_ab2_step(x, x0, x0_prev, sigma, sigma_next, sigma_prev),
        _ab2_reference(x, x0, x0_prev, sigma, sigma_next, sigma_prev),
        rtol=1e-12,
        atol=1e-13,
    )


def test_ab2_step_is_exact_for_a_constant_prediction() -> None:
    # With x0̂ constant the probability-flow ODE solution is x0 + (σ'/σ)(x − x0); the exponential integrator hits it.
    x, x0 = np.array([3.0, -7.0]), np.array([0.5, 1.5])
    np.testing.assert_allclose(res_ab2_step(x, x0, x0, 20.97, 9.62, 42.29), x0 + 9.62 / 20.97 * (x - x0), rtol=1e-13)


# --- denoiser -----------------------------------------------------------------------------------------------------


def test_denoiser_feeds_network_and_replaces_conditioning_frames() -> None:
    masks = np.concatenate([_mask((0, 1)), _mask((0, 1, 2))])  # candidates may differ in their masks
    clean = _clean(batch=2)
    condition = DenoiseCondition.build(clean, masks, batch=2)
    x = initial_noise(3, (2, *SHAPE))
    seen: dict[str, np.ndarray] = {}

    def net(x_in: np.ndarray, timesteps: np.ndarray, mask: np.ndarray) -> np.ndarray:
        seen.update(x_in=x_in.copy(), timesteps=timesteps.copy(), mask=mask.copy())
        return np.full_like(x_in, 0.25)

    x0 = Denoiser(net)(x, 42.29, condition)
    t = _t32(42.29)
    generated = x * (np.float32(1) - t)
    clean_frames = masks[:, 0, :, 0, 0].astype(bool)  # b t
    for b in range(2):
        for frame in range(SHAPE[1]):
            is_clean = clean_frames[b, frame]
            np.testing.assert_array_equal(seen["x_in"][b, :, frame], (clean if is_clean else generated)[b, :, frame])
            assert seen["timesteps"][b, frame] == (0.0 if is_clean else _bf16(t))
            np.testing.assert_array_equal(seen["mask"][b, 0, frame], np.full(SHAPE[2:], float(is_clean)))
            expected_x0 = clean[b, :, frame] if is_clean else generated[b, :, frame] - t * np.float32(0.25)
            np.testing.assert_array_equal(x0[b, :, frame], expected_x0)
    assert seen["timesteps"].dtype == np.float32 and seen["timesteps"].shape == (2, SHAPE[1])
    assert x0.dtype == np.float32


def test_denoiser_rejects_network_output_of_wrong_shape() -> None:
    condition = DenoiseCondition.build(_clean(), _mask(), batch=1)
    with pytest.raises(EngineError, match="network output"):
        Denoiser(lambda x_in, t, m: x_in[:, :8])(initial_noise(0, (1, *SHAPE)), 80.0, condition)


@pytest.mark.parametrize(
    "bad_mask", [np.ones((1, 1, SHAPE[1]), dtype=np.float32), np.full((1, 1, SHAPE[1], 1, 1), 0.5, np.float32)]
)
def test_condition_rejects_malformed_masks(bad_mask: np.ndarray) -> None:
    with pytest.raises(InputError, match="condition_mask"):
        DenoiseCondition.build(_clean(), bad_mask, batch=1)


# --- full sampler -------------------------------------------------------------------------------------------------


def _target_net(target: np.ndarray, sigmas: np.ndarray):
    """A network whose x0 prediction is `target`; the sigmas it is called at are taken in the expected order."""
    expected: Iterator[float] = iter(sigmas)

    def net(x_in: np.ndarray, timesteps: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t = _t32(next(expected))
        generated = timesteps[:, None, :, None, None] != 0
        np.testing.assert_array_equal(timesteps[timesteps != 0], _bf16(t))
        return np.where(generated, (x_in - target) / t, 0.0).astype(np.float32)

    return net


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 10])
def test_sampler_returns_fixed_target_and_keeps_conditioning_frames_clean(num_steps: int) -> None:
    target = np.random.default_rng(4).standard_normal((2, *SHAPE)).astype(np.float32)
    clean = _clean(batch=2)
    call_seconds: list[float] = []
    sigmas = evaluation_sigmas(num_steps)
    out = sample(
        Denoiser(_target_net(target, sigmas)),  # it checks each call's sigma, in order
        clean,
        _mask(),
        seeds=[195, 196],
        num_steps=num_steps,
        on_network_call=call_seconds.append,
    )
    assert out.dtype == np.float32 and out.shape == (2, *SHAPE)
    np.testing.assert_array_equal(out[:, :, list(CLEAN_FRAMES)], clean[:, :, list(CLEAN_FRAMES)])
    np.testing.assert_allclose(out[:, :, 2:], target[:, :, 2:], atol=1e-4)
    assert len(call_seconds) == len(sigmas) == (1 if num_steps <= 2 else num_steps)  # every sigma, one report each


def _reference_sample(net, clean: np.ndarray, mask: np.ndarray, seed: int, num_steps: int) -> np.ndarray:
    """Plain float64 re-derivation: schedule, Euler then AB2 in log-sigma, clean x0 at the last sigma."""
    denoise = Denoiser(net)
    condition = DenoiseCondition.build(clean, mask, batch=1)
    x = np.random.RandomState(seed).standard_normal((1, *SHAPE)).astype(np.float32) * np.float32(80)
    if num_steps <= 2:
        return denoise(x, 80.0, condition)
    n = num_steps - 1
    sigmas = [(80 ** (1 / 7) + i / n * (4 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n + 1)]
    state = x.astype(np.float64)
    history: list[tuple[np.ndarray, float]] = []
    for sigma, sigma_next in itertools.pairwise(sigmas):
        x0 = denoise(state.astype(np.float32), sigma, condition).astype(np.float64)
        if not history:
            state = sigma_next / sigma * state + (1 - sigma_next / sigma) * x0
        else:
            state = _ab2_reference(state, x0, history[-1][0], sigma, sigma_next, history[-1][1])
        history.append((x0, sigma))
    return denoise(state.astype(np.float32), sigmas[-1], condition)


@pytest.mark.parametrize("num_steps", [1, 3, 5, 10])
def test_sampler_matches_float64_reference_with_linear_network(num_steps: int) -> None:
    clean = _clean()
    out = sample(Denoiser(_linear_net()), clean, _mask(), seeds=[7], num_steps=num_steps)
    np.testing.assert_allclose(
        out, _reference_sample(_linear_net(), clean, _mask(), 7, num_steps), rtol=1e-5, atol=1e-5
    )


def test_one_and_two_steps_give_identical_samples() -> None:
    run = [sample(Denoiser(_linear_net()), _clean(), _mask(), seeds=[5], num_steps=n) for n in (1, 2)]
    np.testing.assert_array_equal(run[0], run[1])


def test_sampler_is_deterministic_per_seed_and_batches_one_draw_per_seed() -> None:
    def run(seeds: list[int]) -> np.ndarray:
        return sample(Denoiser(_linear_net()), _clean(), _mask(), seeds=seeds, num_steps=5)

    batched = run([195, 196])
    np.testing.assert_array_equal(batched, run([195, 196]))
    np.testing.assert_array_equal(batched[:1], run([195]))
    np.testing.assert_array_equal(batched[1:], run([196]))
    assert not np.array_equal(batched[0, :, 2:], batched[1, :, 2:])


def test_sampler_rejects_clean_latent_of_other_batch() -> None:
    with pytest.raises(InputError, match="clean_latent"):
        sample(Denoiser(_linear_net()), _clean(batch=3), _mask(), seeds=[1, 2], num_steps=1)


@pytest.mark.parametrize("seed", [0, 1, 195, 4096, MAX_SEED])
def test_variance_scale_is_the_official_draw_of_torchs_generator(seed: int) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)  # the official generate_samples_from_batch with use_variance_scale
    sigma_max_scale = torch.rand(1).item() * 2.0 + 1.0
    sigma_min_scale = torch.rand(1).item() * 0.9 + 0.1
    assert variance_scale(seed) == SigmaScale(sigma_max=sigma_max_scale, sigma_min=sigma_min_scale)


def test_variance_scale_scales_the_schedule_and_the_noise() -> None:
    scale = variance_scale(195)
    assert 1.0 <= scale.sigma_max <= 3.0 and 0.1 <= scale.sigma_min <= 1.0 and scale != SigmaScale()
    sigmas = evaluation_sigmas(5, scale)
    assert sigmas[0] == pytest.approx(80.0 * scale.sigma_max, rel=1e-15)
    assert sigmas[-1] == pytest.approx(4.0 * scale.sigma_min, rel=1e-14)
    assert evaluation_sigmas(1, scale)[0] == pytest.approx(80.0 * scale.sigma_max, rel=1e-15)
    np.testing.assert_array_equal(evaluation_sigmas(2, scale), evaluation_sigmas(1, scale))
    expected = initial_noise(195, (1, *SHAPE)) * np.float32(scale.sigma_max)  # two float32 products, as officially
    np.testing.assert_array_equal(initial_noise(195, (1, *SHAPE), scale), expected)


def test_variance_scale_applies_per_sample_and_only_when_asked() -> None:
    seeds = [195, 196]
    scaled = sample(Denoiser(_linear_net()), _clean(), _mask(), seeds, 3, use_variance_scale=True)
    plain = sample(Denoiser(_linear_net()), _clean(), _mask(), seeds, 3)
    for row, seed in enumerate(seeds):
        alone = sample(Denoiser(_linear_net()), _clean(), _mask(), [seed], 3, use_variance_scale=True)
        np.testing.assert_array_equal(scaled[row], alone[0])
        assert np.abs(scaled[row] - plain[row]).max() > 1e-3  # measured 6.8e-3 and more


@pytest.mark.parametrize("use_variance_scale", [False, True], ids=["plain", "variance scale"])
def test_sampler_matches_torch_pipeline(use_variance_scale: bool) -> None:
    """The official dtype flow re-expressed in torch: float64 schedule and solver, float32 denoiser."""
    torch = pytest.importorskip("torch")
    clean = torch.from_numpy(_clean())
    frame_mask = torch.from_numpy(_mask()).bool()

    def x0_fn(x: "torch.Tensor", sigma: "torch.Tensor") -> "torch.Tensor":
        t = sigma / (sigma + 1)
        x_in = torch.where(frame_mask, clean, x * (1.0 - t))
        x0 = (1.0 - t) * x - t * (0.3 * x_in)
        return torch.where(frame_mask, clean, x0)

    max_scale = min_scale = 1.0
    if use_variance_scale:
        torch.manual_seed(11)
        max_scale = torch.rand(1).item() * 2.0 + 1.0
        min_scale = torch.rand(1).item() * 0.9 + 0.1
    n = 4  # num_steps = 5
    index = torch.arange(n + 1, dtype=torch.float64)
    root_max, root_min = (80.0 * max_scale) ** (1 / 7), (4.0 * min_scale) ** (1 / 7)
    sigmas = (root_max + index / n * (root_min - root_max)) ** 7
    x = torch.from_numpy(np.random.RandomState(11).standard_normal((1, *SHAPE)).astype(np.float32)) * 80 * max_scale
    previous = None
    for s, s_next in itertools.pairwise(sigmas):
        x0 = x0_fn(x.float(), s.float()).double()
        if previous is None:
            x = (s - s_next) / s * x0 + s_next / s * x.double()
        else:
            lam, lam_next, lam_prev = -torch.log(s), -torch.log(s_next), -torch.log(previous[1])
            h = lam_next - lam
            c2 = (lam_prev - lam) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            x = torch.exp(-h) * x + h * ((phi1 - phi2 / c2) * x0 + phi2 / c2 * previous[0])
        previous = (x0, s)
    expected = x0_fn(x.float(), sigmas[-1].float()).numpy()
    out = sample(Denoiser(_linear_net()), _clean(), _mask(), [11], 5, use_variance_scale=use_variance_scale)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_network_call_sigmas_are_float32_of_the_schedule() -> None:
    sigmas: list[float] = []

    def net(x_in: np.ndarray, timesteps: np.ndarray, mask: np.ndarray) -> np.ndarray:
        generated = timesteps[0][timesteps[0] != 0]
        sigmas.append(float(generated[0]))
        return np.zeros_like(x_in)

    sample(Denoiser(net), _clean(), _mask(), seeds=[1], num_steps=3)
    expected = [float(_bf16(_t32(s))) for s in evaluation_sigmas(3)]
    assert sigmas == expected
    assert math.isclose(expected[0], 0.98828125)  # bf16(80/81)


def test_the_noise_of_a_seed_is_drawn_once_and_cannot_be_modified() -> None:
    first, again = initial_noise(11, (1, *SHAPE)), initial_noise(11, (1, *SHAPE))
    assert first is again and not first.flags.writeable
    assert initial_noise(12, (1, *SHAPE)) is not first


def test_passes_of_different_step_counts_in_one_batch_equal_each_pass_alone() -> None:
    masks = np.concatenate([_mask((0, 1)), _mask((0, 1, 2)), _mask((0, 1)), _mask((0, 1))])
    clean = _clean(batch=4)
    seeds, steps = [3, 4, 5, 6], [5, 1, 3, 2]

    calls: list[np.ndarray] = []  # each call's timesteps

    def net(x_in: np.ndarray, timesteps: np.ndarray, mask: np.ndarray) -> np.ndarray:  # reads each row's timestep
        calls.append(timesteps)
        return np.float32(0.3) * x_in * (1 + timesteps[:, None, :, None, None]) + mask

    batched = sample(Denoiser(net), clean, masks, seeds, steps)
    # Call k evaluates the passes that have a k-th call, each at its own sigma (frame 4 is generated in every pass).
    assert [len(timesteps) for timesteps in calls] == [4, 2, 2, 1, 1]
    expected = [_bf16(_t32(evaluation_sigmas(5)[1])), _bf16(_t32(evaluation_sigmas(3)[1]))]
    np.testing.assert_array_equal(calls[1][:, 4], expected)
    for row, (seed, num_steps) in enumerate(zip(seeds, steps, strict=True)):
        alone = sample(Denoiser(net), clean[row : row + 1], masks[row : row + 1], [seed], num_steps)
        np.testing.assert_array_equal(batched[row : row + 1], alone)


def test_sampler_rejects_a_step_list_of_another_length() -> None:
    with pytest.raises(InputError, match="num_steps"):
        sample(Denoiser(_linear_net()), _clean(), _mask(), seeds=[1, 2], num_steps=[1, 2, 3])
