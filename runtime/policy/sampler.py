"""Cosmos Policy sampling: rectified-flow preconditioning, frame-replace conditioning and the RES "2ab" solver.

No torch: the network is an injected callable and the arrays come with it (`arrays.ArrayOps`), so this module serves
ONNX Runtime / TensorRT bundles on numpy and the torch backend on its device tensors. It reproduces the official
inference path (`CosmosPolicySampler`, imaginaire `res_sampler`, `multi_step`, `runge_kutta`,
`RectifiedFlowScaling`, `CosmosPolicyVideo2WorldModel.denoise`):

* the schedule and the solver run in float64, the denoiser in float32 (the official `float64_x0_fn` casts the state
  and sigma to the float32 noise dtype for every call and the prediction back to float64);
* `num_steps` n follows the official rule: n = 1 and n = 2 both make one network call at sigma_max; n >= 3 makes
  n calls (n - 1 solver steps over a Karras schedule of n - 1 intervals, then a clean x0 evaluation at sigma_min);
* the official `use_variance_scale` (off by default, as in every documented command) scales each pass's sigma_max
  (and its initial noise) and sigma_min by factors drawn from the pass's seed (`variance_scale`).

`sample` runs a batch of independent passes, each with its own seed, conditioning and step count: call k evaluates
every pass that has a k-th call, with a sigma per sample (the network takes a timestep per sample). Each pass's
arithmetic is elementwise, so it is bitwise the same whatever else shares its batch.

The arrays live where the network's do (`arrays.ArrayOps`): numpy on the host, or device tensors of the torch backend,
with the same bits; the schedule and solver coefficients are Python floats either way.

Float64 transcendental functions (pow, log, expm1) come from numpy and libm here and from torch in the official code,
so schedule and coefficients can differ in the last ulp; the float32 results are unaffected except at rounding ties.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import numpy.typing as npt

from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from cosmos_edge.runtime.policy.api import MAX_SEED, FloatArray, NetworkFn
from cosmos_edge.runtime.policy.arrays import HOST_ARRAYS, Array, ArrayOps
from cosmos_edge.runtime.policy.numerics import round_to_bf16

SIGMA_MAX = 80.0  # every `*__inference_only` config overrides the SDE to sigma_max=80, sigma_min=4
SIGMA_MIN = 4.0
RHO = 7.0


@dataclass(frozen=True)
class SigmaScale:
    """Factors of one pass's sigma_max (and initial noise) and sigma_min: 1 unless `use_variance_scale`."""

    sigma_max: float = 1.0
    sigma_min: float = 1.0


UNSCALED = SigmaScale()


def variance_scale(seed: int) -> SigmaScale:
    """The official `use_variance_scale` factors of a pass with `seed` (`generate_samples_from_batch`):
    `torch.manual_seed(seed)`, then `torch.rand(1).item() * 2.0 + 1.0` for sigma_max (1 to 3) and
    `torch.rand(1).item() * 0.9 + 0.1` for sigma_min (0.1 to 1), in float64.

    torch's CPU generator is the 32-bit Mersenne Twister seeded as numpy's legacy RandomState is, and its float32
    uniform keeps the low 24 bits of one 32-bit draw: (draw & 0xFFFFFF) / 2**24, exact in float32.
    """
    _check_seed(seed)
    draws = np.random.RandomState(seed).randint(0, 2**32, size=2, dtype=np.uint64)
    first, second = (float(int(draw) & 0xFFFFFF) / 2**24 for draw in draws)
    return SigmaScale(sigma_max=first * 2.0 + 1.0, sigma_min=second * 0.9 + 0.1)


def karras_sigmas(num_intervals: int, scale: SigmaScale = UNSCALED) -> npt.NDArray[np.float64]:
    """`num_intervals + 1` sigmas from SIGMA_MAX down to SIGMA_MIN (each times its `scale`), float64 (EDM eq. 5, as
    imaginaire `get_rev_ts`).

    The last entry is computed by the formula, not pinned to SIGMA_MIN (it is 3.9999999999999987 for 1 interval).
    """
    if num_intervals < 1:
        raise ConfigError(f"karras_sigmas: num_intervals must be >= 1, got {num_intervals}")
    root_max = (SIGMA_MAX * scale.sigma_max) ** (1 / RHO)
    root_min = (SIGMA_MIN * scale.sigma_min) ** (1 / RHO)
    fractions = np.arange(num_intervals + 1, dtype=np.float64) / num_intervals
    return (root_max + fractions * (root_min - root_max)) ** RHO


def evaluation_sigmas(num_steps: int, scale: SigmaScale = UNSCALED) -> npt.NDArray[np.float64]:
    """The sigmas at which `sample` calls the network, in order, for the official `num_steps`.

    `CosmosPolicySampler` subtracts the clean step from num_steps > 1; a remaining single interval takes the
    one-call branch (x0 at sigma_max), otherwise the solver evaluates every sigma but the last and the clean
    step evaluates the last.
    """
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    num_intervals = num_steps - 1 if num_steps > 1 else 1
    sigmas = karras_sigmas(num_intervals, scale)
    return sigmas[:1] if num_intervals == 1 else sigmas


def initial_noise(seed: int, shape: Sequence[int], scale: SigmaScale = UNSCALED) -> FloatArray:
    """x at sigma_max as the official `misc.arch_invariant_rand(...) * sigma_max * sigma_max_variance_scale`.

    Legacy `RandomState(seed).standard_normal(shape)` in C order, cast to float32, then scaled in float32 (by
    SIGMA_MAX, then by a variance scale other than 1).
    """
    _check_seed(seed)
    return _scaled_noise(seed, tuple(shape), scale.sigma_max)


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:  # planning derives seeds s + i: a request's seed near the top can pass it
        raise InputError(f"seed: expected an integer in 0..{MAX_SEED}, got {seed}", field="seed")


@lru_cache(maxsize=64)  # a planning query draws ~150 noise tensors from about a dozen seeds; 0.5 MB each for ALOHA
def _scaled_noise(seed: int, shape: tuple[int, ...], sigma_max_scale: float) -> FloatArray:
    noise = np.random.RandomState(seed).standard_normal(shape).astype(np.float32) * np.float32(SIGMA_MAX)
    if sigma_max_scale != 1.0:
        noise *= np.float32(sigma_max_scale)
    noise.setflags(write=False)  # shared by every caller of the same seed
    return noise


def x0_euler_step(x: Array, x0: Array, sigma: float, sigma_next: float) -> Array:
    """First solver step (imaginaire `reg_x0_euler_step`): x' = (σ−σ')/σ · x0̂ + σ'/σ · x."""
    return ((sigma - sigma_next) / sigma) * x0 + (sigma_next / sigma) * x


def res_ab2_step(x: Array, x0: Array, x0_prev: Array, sigma: float, sigma_next: float, sigma_prev: float) -> Array:
    """Later solver steps: 2nd-order Adams–Bashforth exponential integrator in λ = −log σ (RES, imaginaire
    `res_x0_rk2_step` fed with the previous x0 prediction)."""
    lam, lam_next, lam_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
    h = lam_next - lam
    c2 = (lam_prev - lam) / h  # negative: the previous point lies behind
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    b1 = phi1 - 1.0 / c2 * phi2
    b2 = 1.0 / c2 * phi2
    return math.exp(-h) * x + h * (b1 * x0 + b2 * x0_prev)


@dataclass(frozen=True, eq=False)
class DenoiseCondition:
    """Clean latent and conditioning mask of one `sample` call, broadcast to the batch once (read-only views).

    Build with `DenoiseCondition.build` (numpy), then `placed` where the network's arrays live; the arrays are not
    copied again per network call.
    """

    clean_latent: Array  # "b c t h w" float32
    latent_mask: Array  # "b 1 t 1 1" bool: frame is a clean conditioning frame
    network_mask: Array  # "b 1 t h w" float32, the mask channel the network receives
    frame_mask: np.ndarray  # "b t" bool, always on the host: the timesteps are made there (see `_network_timesteps`)

    @classmethod
    def build(cls, clean_latent: np.ndarray, condition_mask: np.ndarray, batch: int) -> DenoiseCondition:
        """`clean_latent` "b c t h w" and per-frame `condition_mask` "b 1 t 1 1" (1 = clean), b in {1, batch}."""
        clean = np.asarray(clean_latent, dtype=np.float32)
        mask = np.asarray(condition_mask)
        if clean.ndim != 5 or clean.shape[0] not in (1, batch):
            raise InputError(f"clean_latent: expected [1 or {batch}, C, T, H, W], got shape {clean.shape}")
        _, channels, frames, height, width = clean.shape
        if mask.ndim != 5 or mask.shape[0] not in (1, batch) or mask.shape[1:] != (1, frames, 1, 1):
            raise InputError(f"condition_mask: expected [1 or {batch}, 1, {frames}, 1, 1], got shape {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise InputError("condition_mask: values must be 0 or 1")
        latent_mask = np.broadcast_to(mask.astype(bool), (batch, 1, frames, 1, 1))
        return cls(
            clean_latent=np.broadcast_to(clean, (batch, channels, frames, height, width)),  # a view, no copy
            latent_mask=latent_mask,
            network_mask=np.ascontiguousarray(
                np.broadcast_to(latent_mask, (batch, 1, frames, height, width)), dtype=np.float32
            ),
            frame_mask=latent_mask[:, 0, :, 0, 0],
        )

    def placed(self, arrays: ArrayOps) -> DenoiseCondition:
        if arrays is HOST_ARRAYS:
            return self

        def put(array: Array) -> Array:
            return arrays.put(np.ascontiguousarray(array))

        return DenoiseCondition(put(self.clean_latent), put(self.latent_mask), put(self.network_mask), self.frame_mask)

    def select(self, rows: Sequence[int]) -> DenoiseCondition:
        """The condition of some samples of the batch, in the order of `rows`."""
        index = list(rows)
        return DenoiseCondition(
            self.clean_latent[index], self.latent_mask[index], self.network_mask[index], self.frame_mask[index]
        )


class Denoiser:
    """x0 prediction of the official `denoise()` around an injected network.

    Rectified-flow preconditioning with sigma_data = 1: t = σ/(σ+1), c_in = c_skip = 1 − t, c_out = −t, computed in
    float32 from the float32 sigma (not from the bf16 timestep). Generated frames enter the network as (1 − t)·x
    with timestep bf16(t); conditioning frames enter as the clean latent with timestep 0 (sigma_conditional = 0),
    and their x0̂ is overwritten with the clean latent (`denoise_replace_gt_frames`).
    """

    def __init__(self, net: NetworkFn, arrays: ArrayOps = HOST_ARRAYS) -> None:
        self._net = net
        self.arrays = arrays  # where `net` takes and returns its arrays

    def __call__(self, x: Array, sigma: float | Sequence[float], condition: DenoiseCondition) -> Array:
        """x "b c t h w" float32 at noise level `sigma` (one for the batch, or one per sample) -> x0̂ float32."""
        ops = self.arrays
        if tuple(x.shape) != tuple(condition.clean_latent.shape):
            raise InputError(f"x: expected shape {tuple(condition.clean_latent.shape)}, got {tuple(x.shape)}")
        scalar = np.ndim(sigma) == 0  # a Python or numpy scalar: the sigma of the whole batch
        sigmas = [float(sigma)] * x.shape[0] if scalar else [float(s) for s in sigma]  # type: ignore[arg-type, union-attr]
        t = _flow_time(ops, sigmas).reshape(-1, 1, 1, 1, 1)
        scaled = ops.float32(x) * (1.0 - t)  # c_in·x, equal to c_skip·x
        net_input = ops.where(condition.latent_mask, condition.clean_latent, scaled)
        timesteps = _network_timesteps(sigmas, condition.frame_mask)
        velocity = ops.float32(self._net(net_input, timesteps, condition.network_mask))
        if tuple(velocity.shape) != tuple(x.shape):
            raise EngineError(f"network output: expected shape {tuple(x.shape)}, got {tuple(velocity.shape)}")
        x0 = scaled - t * velocity  # c_skip·x + c_out·F with c_out = −t, bitwise
        return ops.where(condition.latent_mask, condition.clean_latent, x0)


def _flow_time(ops: ArrayOps, sigmas: Sequence[float]) -> Array:
    """t = σ/(σ+1) per sample, float32 throughout (Python scalars are weak), where `ops` keeps its arrays."""
    sigma32 = ops.vector32(sigmas)
    return sigma32 / (sigma32 + 1.0)


def _network_timesteps(sigmas: Sequence[float], frame_mask: np.ndarray) -> FloatArray:
    """The network's timesteps "b t": bf16(t) of each sample on its generated frames, 0 on its conditioning frames.

    Host arrays whatever the network's place: a backend may key a cache on their values (the DiT's adaLN vectors)
    without waiting for its device.
    """
    t_bf16 = round_to_bf16(_flow_time(HOST_ARRAYS, sigmas))
    return np.where(frame_mask, np.float32(0.0), t_bf16[:, None])


def sample(
    denoiser: Denoiser,
    clean_latent: np.ndarray,
    condition_mask: np.ndarray,
    seeds: Sequence[int],
    num_steps: int | Sequence[int],
    on_network_call: Callable[[float], None] | None = None,
    *,
    use_variance_scale: bool = False,
) -> Array:
    """Generates one latent sequence per seed, "b c t h w" float32 with b = len(seeds), where the denoiser's
    arrays live.

    Args:
        denoiser: wraps the network; all samples of a call go through it as one batch.
        clean_latent: "b c t h w", b in {1, len(seeds)}: the official `gt_frames` (bf16-valued VAE latents with the
            injected proprio in an action pass; the previous sample in world-model and value passes).
        condition_mask: "b 1 t 1 1", b in {1, len(seeds)}, 1 on clean conditioning frames (see `conditioning`).
        seeds: one initial noise draw per seed, equal to an official single-sample call with that seed.
        num_steps: the official step count (1 and 2 are the same single call; n >= 3 makes n calls), for the batch
            or per sample.
        on_network_call: called after every network evaluation with its wall seconds (the network call and the
            denoiser's elementwise work, waited for on a device), e.g. to record per-call latency.
        use_variance_scale: the official option: each sample's sigma range and noise scaled by `variance_scale` of
            its seed.
    """
    if not seeds:
        raise InputError("seeds: expected at least one seed")
    steps = [num_steps] * len(seeds) if isinstance(num_steps, int) else list(num_steps)
    if len(steps) != len(seeds):
        raise InputError(f"num_steps: expected one step count or one per seed ({len(seeds)}), got {len(steps)}")
    ops = denoiser.arrays
    condition = DenoiseCondition.build(clean_latent, condition_mask, batch=len(seeds))
    sample_shape = (1, *condition.clean_latent.shape[1:])
    condition = condition.placed(ops)
    scales = [variance_scale(seed) if use_variance_scale else UNSCALED for seed in seeds]
    schedules = [evaluation_sigmas(n, scale) for n, scale in zip(steps, scales, strict=True)]
    noise = ops.concat(
        [
            ops.put_cached(("noise", seed, sample_shape, scale), partial(initial_noise, seed, sample_shape, scale))
            for seed, scale in zip(seeds, scales, strict=True)
        ]
    )
    num_calls = max(len(schedule) for schedule in schedules)
    if num_calls == 1:  # every sample is one x0 prediction at sigma_max: no float64 state needed
        return _evaluate(denoiser, noise, condition, range(len(seeds)), schedules, 0, on_network_call)
    x = ops.float64(noise)
    out = ops.empty_like(noise)
    previous: list[tuple[Array, float] | None] = [None] * len(seeds)
    for index in range(num_calls):
        rows = [row for row, schedule in enumerate(schedules) if index < len(schedule)]
        every = len(rows) == len(seeds)
        called = condition if every else condition.select(rows)
        x_in = ops.float32(x if every else x[rows])
        x0 = _evaluate(denoiser, x_in, called, rows, schedules, index, on_network_call)
        for position, row in enumerate(rows):
            sigmas = schedules[row]
            if index == len(sigmas) - 1:  # `sample_clean`: the x0 prediction at the last sigma, not the solver's x
                out[row] = x0[position]
                continue
            estimate = ops.float64(x0[position])
            sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
            last = previous[row]
            if last is None:
                x[row] = x0_euler_step(x[row], estimate, sigma, sigma_next)
            else:
                x[row] = res_ab2_step(x[row], estimate, last[0], sigma, sigma_next, last[1])
            previous[row] = (estimate, sigma)
    return out


def _evaluate(
    denoiser: Denoiser,
    x: Array,
    condition: DenoiseCondition,
    rows: Sequence[int],
    schedules: Sequence[npt.NDArray[np.float64]],
    index: int,
    on_network_call: Callable[[float], None] | None,
) -> Array:
    """The `index`-th network call of the samples `rows`, each at its own schedule's sigma."""
    sigmas = tuple(float(schedules[row][index]) for row in rows)
    start = time.perf_counter()
    x0 = denoiser(x, sigmas, condition)
    if on_network_call is not None:
        # Device work is asynchronous: time the call, not its launch. Waiting also keeps the host at most one call
        # ahead of the device, which a planning deadline relies on (it stops a pass between calls).
        denoiser.arrays.synchronize()
        on_network_call(time.perf_counter() - start)
    return x0
