"""Cosmos Policy sampling: rectified-flow preconditioning, frame-replace conditioning and the RES "2ab" solver.

Numpy only: the network is an injected callable, so this module serves ONNX Runtime / TensorRT bundles as well as
the torch reference. It reproduces the official inference path (`CosmosPolicySampler`, imaginaire `res_sampler`,
`multi_step`, `runge_kutta`, `RectifiedFlowScaling`, `CosmosPolicyVideo2WorldModel.denoise`):

* the schedule and the solver run in float64, the denoiser in float32 (the official `float64_x0_fn` casts the state
  and sigma to the float32 noise dtype for every call and the prediction back to float64);
* `num_steps` n follows the official rule: n = 1 and n = 2 both make one network call at sigma_max; n >= 3 makes
  n calls (n - 1 solver steps over a Karras schedule of n - 1 intervals, then a clean x0 evaluation at sigma_min).

`sample` runs a batch of independent passes, each with its own seed, conditioning and step count: call k evaluates
every pass that has a k-th call, with a sigma per sample (the network takes a timestep per sample). Each pass's
arithmetic is elementwise, so it is bitwise the same whatever else shares its batch.

Float64 transcendental functions (pow, log, expm1) come from libm here and from torch/Sleef in the official code,
so schedule and coefficients can differ in the last ulp; the float32 results are unaffected except at rounding ties.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from cosmos_edge.runtime.policy.api import FloatArray, NetworkFn
from cosmos_edge.runtime.policy.numerics import round_to_bf16

SIGMA_MAX = 80.0  # every `*__inference_only` config overrides the SDE to sigma_max=80, sigma_min=4
SIGMA_MIN = 4.0
RHO = 7.0

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class NetworkCall:
    """Reported after each network evaluation of `sample`.

    `seconds` is the wall time of the whole denoiser evaluation (the network call plus O(numel) numpy work);
    wrap the network callable to time the DiT alone.
    """

    index: int
    num_calls: int
    sigmas: tuple[float, ...]  # one per sample of the call
    seconds: float


def karras_sigmas(
    num_intervals: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, rho: float = RHO
) -> npt.NDArray[np.float64]:
    """`num_intervals + 1` sigmas from sigma_max down to sigma_min, float64 (EDM eq. 5, as imaginaire `get_rev_ts`).

    The last entry is computed by the formula, not pinned to sigma_min (it is 3.9999999999999987 for 1 interval).
    """
    if num_intervals < 1:
        raise ConfigError(f"karras_sigmas: num_intervals must be >= 1, got {num_intervals}")
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    root_max = sigma_max ** (1 / rho)
    root_min = sigma_min ** (1 / rho)
    fractions = np.arange(num_intervals + 1, dtype=np.float64) / num_intervals
    return (root_max + fractions * (root_min - root_max)) ** rho


def evaluation_sigmas(
    num_steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, rho: float = RHO
) -> npt.NDArray[np.float64]:
    """The sigmas at which `sample` calls the network, in order, for the official `num_steps`.

    `CosmosPolicySampler` subtracts the clean step from num_steps > 1; a remaining single interval takes the
    one-call branch (x0 at sigma_max), otherwise the solver evaluates every sigma but the last and the clean
    step evaluates the last.
    """
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    num_intervals = num_steps - 1 if num_steps > 1 else 1
    sigmas = karras_sigmas(num_intervals, sigma_max, sigma_min, rho)
    return sigmas[:1] if num_intervals == 1 else sigmas


def initial_noise(seed: int, shape: Sequence[int], sigma_max: float = SIGMA_MAX) -> FloatArray:
    """x at sigma_max as the official `misc.arch_invariant_rand(...) * sigma_max`.

    Legacy `RandomState(seed).standard_normal(shape)` in C order, cast to float32, then scaled in float32.
    """
    if not 0 <= seed < 2**32:
        raise InputError(f"seed: expected an integer in [0, 2**32), got {seed}")
    return _scaled_noise(seed, tuple(shape), float(sigma_max))


@lru_cache(maxsize=64)  # a planning query draws ~150 noise tensors from about a dozen seeds; 0.5 MB each for ALOHA
def _scaled_noise(seed: int, shape: tuple[int, ...], sigma_max: float) -> FloatArray:
    noise = np.random.RandomState(seed).standard_normal(shape).astype(np.float32) * np.float32(sigma_max)
    noise.setflags(write=False)  # shared by every caller of the same seed
    return noise


def x0_euler_step(
    x: npt.NDArray[np.float64], x0: npt.NDArray[np.float64], sigma: float, sigma_next: float
) -> npt.NDArray[np.float64]:
    """First solver step (imaginaire `reg_x0_euler_step`): x' = (σ−σ')/σ · x0̂ + σ'/σ · x."""
    return ((sigma - sigma_next) / sigma) * x0 + (sigma_next / sigma) * x


def res_ab2_step(
    x: npt.NDArray[np.float64],
    x0: npt.NDArray[np.float64],
    x0_prev: npt.NDArray[np.float64],
    sigma: float,
    sigma_next: float,
    sigma_prev: float,
) -> npt.NDArray[np.float64]:
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

    Build with `DenoiseCondition.build`; the arrays are not copied again per network call.
    """

    clean_latent: FloatArray  # "b c t h w"
    latent_mask: BoolArray  # "b 1 t 1 1": frame is a clean conditioning frame
    frame_mask: BoolArray  # "b t"
    network_mask: FloatArray  # "b 1 t h w", the mask channel the network receives

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
            frame_mask=latent_mask[:, 0, :, 0, 0],
            network_mask=np.ascontiguousarray(
                np.broadcast_to(latent_mask, (batch, 1, frames, height, width)), dtype=np.float32
            ),
        )

    def select(self, rows: Sequence[int]) -> DenoiseCondition:
        """The condition of some samples of the batch, in the order of `rows`."""
        index = list(rows)
        return DenoiseCondition(
            self.clean_latent[index], self.latent_mask[index], self.frame_mask[index], self.network_mask[index]
        )


class Denoiser:
    """x0 prediction of the official `denoise()` around an injected network.

    Rectified-flow preconditioning with sigma_data = 1: t = σ/(σ+1), c_in = c_skip = 1 − t, c_out = −t, computed in
    float32 from the float32 sigma (not from the bf16 timestep). Generated frames enter the network as (1 − t)·x
    with timestep bf16(t); conditioning frames enter as the clean latent with timestep 0 (sigma_conditional = 0),
    and their x0̂ is overwritten with the clean latent (`denoise_replace_gt_frames`).
    """

    def __init__(self, net: NetworkFn) -> None:
        self._net = net

    def __call__(self, x: FloatArray, sigma: float | Sequence[float], condition: DenoiseCondition) -> FloatArray:
        """x "b c t h w" float32 at noise level `sigma` (one for the batch, or one per sample) -> x0̂ float32."""
        if x.shape != condition.clean_latent.shape:
            raise InputError(f"x: expected shape {condition.clean_latent.shape}, got {x.shape}")
        sigma32 = np.broadcast_to(np.asarray(sigma, dtype=np.float32), (x.shape[0],))
        t = (sigma32 / (sigma32 + np.float32(1.0))).reshape(-1, 1, 1, 1, 1)
        scaled = np.asarray(x, dtype=np.float32) * (np.float32(1.0) - t)  # c_in·x, equal to c_skip·x
        net_input = np.where(condition.latent_mask, condition.clean_latent, scaled)
        t_bf16 = round_to_bf16(t[:, 0, 0, 0, :])  # "b 1": each sample's timestep
        timesteps = np.where(condition.frame_mask, np.float32(0.0), t_bf16)
        velocity = np.asarray(self._net(net_input, timesteps, condition.network_mask), dtype=np.float32)
        if velocity.shape != x.shape:
            raise EngineError(f"network output: expected shape {x.shape}, got {velocity.shape}")
        x0 = scaled - t * velocity  # c_skip·x + c_out·F with c_out = −t, bitwise
        return np.where(condition.latent_mask, condition.clean_latent, x0)


def sample(
    denoiser: Denoiser,
    clean_latent: np.ndarray,
    condition_mask: np.ndarray,
    seeds: Sequence[int],
    num_steps: int | Sequence[int],
    on_network_call: Callable[[NetworkCall], None] | None = None,
) -> FloatArray:
    """Generates one latent sequence per seed, "b c t h w" float32 with b = len(seeds).

    Args:
        denoiser: wraps the network; all samples of a call go through it as one batch.
        clean_latent: "b c t h w", b in {1, len(seeds)}: the official `gt_frames` (bf16-valued VAE latents with the
            injected proprio in an action pass; the previous sample in world-model and value passes).
        condition_mask: "b 1 t 1 1", b in {1, len(seeds)}, 1 on clean conditioning frames (see `conditioning`).
        seeds: one initial noise draw per seed, equal to an official single-sample call with that seed.
        num_steps: the official step count (1 and 2 are the same single call; n >= 3 makes n calls), for the batch
            or per sample.
        on_network_call: called after every network evaluation, e.g. to record per-call latency.
    """
    if not seeds:
        raise InputError("seeds: expected at least one seed")
    steps = [num_steps] * len(seeds) if isinstance(num_steps, int) else list(num_steps)
    if len(steps) != len(seeds):
        raise InputError(f"num_steps: expected one step count or one per seed ({len(seeds)}), got {len(steps)}")
    condition = DenoiseCondition.build(clean_latent, condition_mask, batch=len(seeds))
    schedules = [evaluation_sigmas(n) for n in steps]
    sample_shape = (1, *condition.clean_latent.shape[1:])
    noise = np.concatenate([initial_noise(seed, sample_shape) for seed in seeds])
    num_calls = max(len(schedule) for schedule in schedules)
    if num_calls == 1:  # every sample is one x0 prediction at sigma_max: no float64 state needed
        return _evaluate(denoiser, noise, condition, [0] * len(seeds), schedules, 0, num_calls, on_network_call)
    x = noise.astype(np.float64)
    out = np.empty_like(noise)
    previous: list[tuple[npt.NDArray[np.float64], float] | None] = [None] * len(seeds)
    for index in range(num_calls):
        rows = [row for row, schedule in enumerate(schedules) if index < len(schedule)]
        called = condition if len(rows) == len(seeds) else condition.select(rows)
        x0 = _evaluate(denoiser, x[rows].astype(np.float32), called, rows, schedules, index, num_calls, on_network_call)
        for position, row in enumerate(rows):
            sigmas = schedules[row]
            if index == len(sigmas) - 1:  # `sample_clean`: the x0 prediction at the last sigma, not the solver's x
                out[row] = x0[position]
                continue
            estimate = x0[position].astype(np.float64)
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
    x: FloatArray,
    condition: DenoiseCondition,
    rows: Sequence[int],
    schedules: Sequence[npt.NDArray[np.float64]],
    index: int,
    num_calls: int,
    on_network_call: Callable[[NetworkCall], None] | None,
) -> FloatArray:
    """The `index`-th network call of the samples `rows`, each at its own schedule's sigma."""
    sigmas = tuple(float(schedules[row][index]) for row in rows)
    start = time.perf_counter()
    x0 = denoiser(x, sigmas, condition)
    if on_network_call is not None:
        on_network_call(NetworkCall(index, num_calls, sigmas, time.perf_counter() - start))
    return x0
