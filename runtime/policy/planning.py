"""Best-of-N planning as the official ALOHA planning server computes it (`deploy.py` `PolicyServer.get_server_action`
with `cosmos_utils.get_future_state_prediction` / `get_value_prediction` / `get_qvalue_prediction`).

Candidate i takes seed s + i. Its action pass runs the policy model; then, per `PlanningConfig`:

* scored by the planning model (`ar_value_prediction`): world-model passes (step counts `future_steps()`, the j-th with
  seed s + j), and for every predicted state value passes (`value_steps()`, the k-th with seed s + k, the same seeds
  for every state); the values of all states and members are pooled and aggregated once. Without the value ensemble
  only the value of the first predicted state counts (QUIRK, cosmos_utils.py 1508-1541: the others are computed there
  and dropped, so they are not computed here);
* scored by Q(s, a) (`ar_qvalue_prediction`): value passes conditioned on the action pass itself;
* otherwise by the value slot of its own action pass.

`search_depth` d > 1 repeats action → world model → value from each predicted state (its predicted images and proprio
moved into the current-state slots, deploy.py 486-490; then the observed proprio written back over the proprio, as
every official pass re-injects it: QUIRK, policy_video2world_model.py 652-662). Every level reuses the candidate's
seeds. Level 2 expands every state of level 1, later levels only the states of the last branch (QUIRK, deploy.py
479-480, 545). The per-level values are aggregated by `search_depth_value_aggregation_scheme`; the chunk returned is
always the first level's; every level's chunks are kept (the official `actions_by_depth`).

The best candidate wins, the base seed's unless another is strictly better (deploy.py 645-654). Every pass runs as one
batch over a worker's candidates (under a deadline, one candidate at a time, so that each one scored counts); with
`batch_passes`, independent passes (ensemble members, branches of a level) share that batch too: the main
configuration makes 20 DiT calls per query instead of 61 per candidate (488 for best of 8, with ALOHA's 10 action
steps; 15 instead of 56 per candidate with LIBERO's and RoboCasa's 5). The candidates are split over the devices
(`DeviceNetworks` each), whose workers run concurrently. Neither batching nor the split changes a candidate's value:
each sample's arithmetic is its own (up to the network's batch-size-dependent rounding).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.platforms import LATENT_CHANNELS, LATENT_SIZE
from cosmos_edge.runtime.policy.api import (
    ActionQuery,
    CandidateResults,
    ChunkResult,
    DenoisingNetwork,
    Observation,
    StageTimer,
)
from cosmos_edge.runtime.policy.candidate_search import CandidateScores, CandidateSearch, Stopped
from cosmos_edge.runtime.policy.planning_config import FutureStateAggregation, PlanningConfig
from cosmos_edge.runtime.policy.ranking import BasePass, RankedCandidates, rank_candidates
from cosmos_edge.runtime.policy.steps import (
    EncodedObservation,
    ModelPolicy,
    PolicyModel,
    TextBinding,
    check_finite_result,
    decode_future_images,
    denoising_steps,
    encode_observation,
    read_values,
)

_LOG = logging.getLogger(__name__)
_LONGEST_DEADLINE_MS = 86_400_000  # a day; waits take a C integer of time


def candidate_shares(num_candidates: int, num_workers: int) -> list[list[int]]:
    """Candidate indices per worker, round robin; the batch sizes a worker's DiT must serve follow from these."""
    return [list(range(index, num_candidates, num_workers)) for index in range(num_workers)]


def planning_batch_sizes(num_candidates: int, num_workers: int) -> tuple[int, ...]:
    """The DiT batch sizes a planning worker runs (and batch 1 for the reactive mode), sorted."""
    shares = {len(share) for share in candidate_shares(num_candidates, num_workers)} - {0}
    return tuple(sorted({1, *shares}))


@dataclass(frozen=True)
class DeviceNetworks:
    """The networks of one device: the policy DiT (actions) and the planning DiT (future state, value). They are
    the same object when no separate planning checkpoint is given."""

    policy_network: DenoisingNetwork
    planning_network: DenoisingNetwork


@dataclass(frozen=True)
class _BoundWorker:
    policy: TextBinding
    planner: TextBinding


class PlanningPolicy(ModelPolicy):
    """A `Policy` whose chunk is the best of `num_queries_best_of_n` sampled chunks. `close()` stops its threads at
    their next network call (a query in flight then fails with `EngineError`; Ctrl-C does not wait for its end).

    `batch_passes=False` runs the passes one after another in the official order (the reference that batching is
    tested and measured against); it computes the same values.

    `deadline_ms`: a query answers within this time of its start (plus at most the network call in flight when it
    expires, which any next query on the device waits for; encoding the observation and the base candidate's action
    pass are always waited for, and future images, when asked, are decoded after it). The base candidate's action
    pass runs first, then each worker scores its candidates one at a time; at the deadline the workers stop at their
    next network call and the query answers with the best candidate scored so far, or with the base candidate's
    unranked action pass (`PlanningOutcome`). Scoring one candidate at a time forgoes batching the candidates of a
    worker, so a deadline costs throughput when it is met.

    `encode_full_sequence`: encode the observation as `ReactivePolicy`'s reference does (all pixel frames).
    `use_variance_scale`: the official option, for every pass (see `ReactivePolicy`).
    """

    def __init__(
        self,
        model: PolicyModel,
        device_networks: Sequence[DeviceNetworks],
        config: PlanningConfig | None = None,
        *,
        batch_passes: bool = True,
        deadline_ms: float | None = None,
        encode_full_sequence: bool = False,
        use_variance_scale: bool = False,
    ) -> None:
        if not device_networks:
            raise ConfigError("device_networks: expected the networks of at least one device")
        if deadline_ms is not None and not 0 < deadline_ms <= _LONGEST_DEADLINE_MS:
            raise ConfigError(
                f"planning_deadline_ms: expected a positive number of milliseconds up to a day "
                f"({_LONGEST_DEADLINE_MS}), got {deadline_ms}"
            )
        self._model = model
        text = model.text_embeddings
        self._workers = tuple(
            _BoundWorker(TextBinding(w.policy_network, text), TextBinding(w.planning_network, text))
            for w in device_networks
        )
        self._config = config or PlanningConfig()
        self._batch_passes = batch_passes
        self._encode_full_sequence = encode_full_sequence
        self._use_variance_scale = use_variance_scale
        self._deadline_s = None if deadline_ms is None else deadline_ms / 1e3
        self._pool = ThreadPoolExecutor(max_workers=len(device_networks), thread_name_prefix="planning")
        self._stopping: list[Future[None]] = []  # workers of a query past its deadline, finishing their last call
        self._closing = threading.Event()

    @property
    def config(self) -> PlanningConfig:
        return self._config

    @property
    def batch_passes(self) -> bool:
        return self._batch_passes

    @property
    def deadline_ms(self) -> float | None:
        return None if self._deadline_s is None else self._deadline_s * 1e3

    def warm_up(self, observation: Observation | None = None) -> None:
        """One DiT call on each worker's networks at the batch of its share of the candidates (at least 2), on the
        planning threads: a compiled DiT compiles its graph for batches above 1 (minutes at 2B), and an engine runs
        its graph of that batch for the first time, now rather than on the first planning request. With an
        `observation`, each worker also scores one candidate of it as a deadline's query does, at batch 1 with the
        action pass's default steps: the batch-1 graphs of every device, and a DiT that
        replays CUDA graphs captures the timesteps of those passes, before a deadline has to wait for them."""
        if observation is not None:
            steps = self._action_steps()
            query = ActionQuery(observation, self.instructions[0], steps=steps)
            clean = encode_observation(self._model, observation, StageTimer(), self._encode_full_sequence).clean

            def score_one(worker: _BoundWorker) -> None:
                search = self._search(worker, query, [query.seed], steps)
                search.score(search.act(clean), clean)

            for job in [self._pool.submit(score_one, worker) for worker in self._workers]:
                job.result()
        platform, instruction = self._model.platform, self.instructions[0]
        frames = platform.num_latent_frames

        def warm(worker: _BoundWorker, batch: int) -> None:
            x = np.zeros((batch, LATENT_CHANNELS, frames, LATENT_SIZE, LATENT_SIZE), np.float32)
            timesteps = np.zeros((batch, frames), np.float32)  # host arrays, as the sampler passes them
            mask = np.zeros((batch, 1, frames, LATENT_SIZE, LATENT_SIZE), np.float32)
            for binding in (worker.policy, worker.planner):
                bound = binding.for_instruction(instruction, StageTimer())
                put = bound.arrays.put
                bound.arrays.fetch(bound.call(put(x), timesteps, put(mask)))

        shares = candidate_shares(self._config.num_queries_best_of_n, len(self._workers))
        jobs = [self._pool.submit(warm, w, max(2, len(s))) for w, s in zip(self._workers, shares, strict=True)]
        for job in jobs:
            job.result()
        self.reset()

    def reset(self) -> None:
        self._finish_stopping()
        for worker in self._workers:
            worker.policy.reset()
            worker.planner.reset()

    def close(self) -> None:
        self._closing.set()  # the workers stop at their next network call
        self._pool.shutdown(wait=True)

    def _action_steps(self) -> int:
        """The action pass's steps when the query names none: the configuration's, else the platform's default."""
        return self._config.num_denoising_steps_action or self.platform.default_action_steps

    def infer(self, query: ActionQuery) -> ChunkResult:
        config = self._config
        config.check_seed(query.seed)
        self._finish_stopping()  # the last query's stopped workers: their last network call, and any failure
        started = time.perf_counter()
        steps = denoising_steps(query, self._action_steps())
        timer = StageTimer()
        # Future images are decoded over the placeholder latents of the whole sequence, as the official code does.
        full = self._encode_full_sequence or (query.return_future_images and self._config.predicts_future_images)
        encoded = encode_observation(self._model, query.observation, timer, full_sequence=full)
        try:
            if self._closing.is_set():  # closed while the observation encoded: no worker may start
                raise Stopped
            with timer.stage("planning"):
                if self._deadline_s is None:
                    scores = self._score_all(query, encoded.clean, steps)
                else:
                    scores = self._score_until(started + self._deadline_s, query, encoded.clean, steps)
            actions, future_proprio = scores.actions_by_depth[:, 0], scores.future_proprio
            images = self._future_images(scores, encoded, query, steps, timer) if query.return_future_images else None
        except Stopped:
            raise EngineError("planning: the policy was closed during the query") from None
        chosen = scores.chosen
        check_finite_result(actions[chosen], scores.value, future_proprio[chosen])
        candidates = CandidateResults(
            chosen, actions, scores.values, scores.values_by_depth, scores.actions_by_depth, scores.outcome
        )
        return ChunkResult(actions[chosen], scores.value, future_proprio[chosen], images, timer.as_dict(), candidates)

    def _future_images(
        self, ranked: RankedCandidates, encoded: EncodedObservation, query: ActionQuery, steps: int, timer: StageTimer
    ) -> dict[str, np.ndarray] | None:
        """The chosen candidate's future images as the official server returns them (deploy.py 388-423): those of
        its predicted states, combined by `future_state_ensemble_aggregation_scheme`, when a world model ran; else
        its action pass's own; none for Q(s, a) planning without `ar_future_prediction`."""
        config = self._config
        if not config.predicts_future_images:
            return None
        chosen = ranked.latents[ranked.chosen : ranked.chosen + 1]
        states = ranked.chosen_states
        if config.ar_qvalue_prediction and not config.ar_value_prediction:
            # The official server runs every candidate's world-model passes here only for the images it returns (the
            # Q value ranks): the chosen candidate's passes, run now, give the same images.
            search = self._search(self._workers[0], query, [query.seed + ranked.chosen], steps)
            with timer.stage("planning"):
                (predicted,) = search.predicted_states([chosen])
            states = tuple(predicted)
        if not states:  # ranked by its own action pass, or the deadline left nothing else
            return decode_future_images(self._model, chosen, encoded, timer)
        images = [decode_future_images(self._model, state, encoded, timer) for state in states]
        if config.future_state_ensemble_aggregation_scheme is FutureStateAggregation.LAST:
            return images[-1]
        # cosmos_utils.py 837-848: the float32 mean of the members, rounded half to even, clipped to uint8.
        stacked = {camera: np.stack([image[camera] for image in images]).astype(np.float32) for camera in images[0]}
        return {
            camera: np.clip(np.round(planes.mean(axis=0)), 0, 255).astype(np.uint8)
            for camera, planes in stacked.items()
        }

    def _score_all(self, query: ActionQuery, clean: np.ndarray, steps: int) -> RankedCandidates:
        """Every candidate, each worker's share as one batch."""
        shares = candidate_shares(self._config.num_queries_best_of_n, len(self._workers))
        jobs = [
            (share, self._pool.submit(self._search(worker, query, [query.seed + i for i in share], steps).run, clean))
            for worker, share in zip(self._workers, shares, strict=True)
            if share
        ]
        wait([job for _, job in jobs])  # no worker outlives the query, even when another fails
        scored = {}
        for share, job in jobs:
            result = job.result()
            for position, index in enumerate(share):
                scored[index] = result.row(position)
        return rank_candidates(
            self._model, scored, self._config.num_queries_best_of_n, entries=self._config.value_entries()
        )

    def _score_until(self, deadline: float, query: ActionQuery, clean: np.ndarray, steps: int) -> RankedCandidates:
        """The base candidate's action pass, then candidates one at a time per worker until done or `deadline`."""
        base_search = self._search(self._workers[0], query, [query.seed], steps)
        base_latent = base_search.act(clean)
        stop, scored = threading.Event(), dict[int, CandidateScores]()

        def score_share(worker: _BoundWorker, share: list[int]) -> None:
            for index in share:
                search = self._search(worker, query, [query.seed + index], steps, stop)
                try:
                    scored[index] = search.score(base_latent, clean) if index == 0 else search.run(clean)
                except Stopped:
                    if self._closing.is_set():  # not the deadline: the query fails, as every query `close` stops
                        raise
                    return

        num_candidates, entries = self._config.num_queries_best_of_n, self._config.value_entries()
        base = BasePass(base_latent, float(read_values(self._model.platform, base_latent)[0]))
        left_s = deadline - time.perf_counter()
        if left_s <= 0:  # the encode and the base action pass used the whole deadline: nothing else starts
            deadline_ms = self.deadline_ms or 0.0
            _LOG.warning(
                "planning deadline %.0f ms passed before any candidate was scored: encoding the observation and the "
                "base candidate's action pass took %.0f ms",
                deadline_ms,
                deadline_ms - left_s * 1e3,
            )
            return rank_candidates(self._model, {}, num_candidates, entries=entries, base=base)
        shares = candidate_shares(num_candidates, len(self._workers))
        jobs = [self._pool.submit(score_share, w, share) for w, share in zip(self._workers, shares, strict=True)]
        done, late = wait(jobs, timeout=left_s, return_when=FIRST_EXCEPTION)
        if late:  # the deadline passed, or a worker failed: the others stop at their next network call
            stop.set()
            self._stopping = list(late)
        for job in done:
            job.result()  # a worker that failed fails the query
        if late:
            _LOG.warning(
                "planning deadline %.0f ms passed with %d of %d candidates scored",
                self.deadline_ms or 0.0,
                len(scored),
                num_candidates,
            )
        return rank_candidates(self._model, dict(scored), num_candidates, entries=entries, base=base)

    def _search(
        self,
        worker: _BoundWorker,
        query: ActionQuery,
        seeds: list[int],
        steps: int,
        stop: threading.Event | None = None,
    ) -> CandidateSearch:
        timer = StageTimer()  # per worker; the caller reports the wall time of all workers together
        stops = (self._closing,) if stop is None else (self._closing, stop)
        return CandidateSearch(
            self._config,
            self._model,
            worker.policy.for_instruction(query.instruction, timer),
            worker.planner.for_instruction(query.instruction, timer),
            seeds,
            steps,
            self._batch_passes,
            timer,
            self._use_variance_scale,
            stops,
        )

    def _finish_stopping(self) -> None:
        """Waits for the workers stopped by the last query's deadline (at most their DiT call in flight)."""
        for job in self._stopping:
            try:
                job.result()
            except Exception:  # it failed after its query was answered: report it, do not fail this query
                _LOG.exception("a planning worker stopped by the deadline failed")
        self._stopping = []
