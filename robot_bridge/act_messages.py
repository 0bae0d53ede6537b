"""Where the wire meets the policy API: an `act` request as a policy query, and the policy's result as its reply."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cosmos_edge.robot_bridge.protocol import ActReply, ActRequest
from cosmos_edge.robot_bridge.wire import WireLimits
from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy.api import ActionQuery, CandidateResults, ChunkResult, Observation, PlanningOutcome
from cosmos_edge.runtime.version import installed_version

SERVER_VERSION = installed_version()


def action_query(request: ActRequest) -> ActionQuery:
    """The policy query of an `act`; an unset seed keeps the query's default (the official seed)."""
    query = ActionQuery(
        observation=Observation(images=request.images, proprio=request.proprio),
        instruction=request.instruction,
        steps=request.steps,
    )
    return query if request.seed is None else dataclasses.replace(query, seed=request.seed)


# The largest array a ZeroMQ client decodes with its default limits.
CLIENT_ARRAY_BYTES = WireLimits().max_array_bytes


def act_reply(
    request: ActRequest,
    result: ChunkResult,
    platform: PlatformSpec,
    *,
    mode: str,
    timings_ms: Mapping[str, float],
    receive_ns: int,
    array_limit: int | None = CLIENT_ARRAY_BYTES,
) -> ActReply:
    """The reply to `request` from the policy's `result`; a chunk not of the platform's shape is the policy's defect
    (ValueError). `timings_ms`: the server's stages around the policy's own. `array_limit`: the largest array the
    requester decodes (a ZeroMQ client's default limit; None for a front end that decodes nothing, such as HTTP)."""
    expected = (platform.chunk_size, platform.action_dim)
    actions = np.asarray(result.actions, dtype=np.float32)
    if actions.shape != expected:
        raise ValueError(f"policy returned actions of shape {actions.shape}, expected {expected}")
    return ActReply(
        request.request_id,
        obs_id=request.obs_id,
        actions=actions,
        value=result.value,
        mode=mode,
        timings_ms=dict(timings_ms),
        server_version=SERVER_VERSION,
        server_receive_ns=receive_ns,
        server_send_ns=time.time_ns(),
        **_candidate_fields(result.candidates, request, array_limit),
    )


def _candidate_fields(
    candidates: CandidateResults | None, request: ActRequest, array_limit: int | None
) -> dict[str, Any]:
    """The planning fields of an `act_result`, when the request asked for them (a client that predates them asks
    nothing and gets a reply it can decode); none for a reactive result. NaN (not computed in time) travels as null
    values and zero actions (`sampled_chunks` restores them)."""
    return_all = bool(request.return_all_query_results)
    if candidates is None or not (request.planning_summary or return_all):
        return {}

    def values(array: np.ndarray) -> tuple[float | None, ...]:
        return tuple(None if np.isnan(value) else float(value) for value in array)

    fields: dict[str, Any] = {
        "planning": candidates.outcome.value,
        "chosen_index": candidates.chosen,
        "candidate_values": values(candidates.values),
    }
    if return_all:
        fields["candidate_values_by_depth"] = tuple(values(row) for row in candidates.values_by_depth)
        fields["candidate_actions"] = _finite_for_wire(candidates.actions)
        if request.return_actions_by_depth:
            fields["candidate_actions_by_depth"] = _chunks_by_depth(candidates, array_limit)
    return fields


def _chunks_by_depth(candidates: CandidateResults, limit: int | None) -> np.ndarray:
    """Every candidate's chunk at every depth, refused (an error reply naming the field) when it is larger than the
    requester decodes in one array (a deep search over many candidates)."""
    chunks = _finite_for_wire(candidates.actions_by_depth)
    if limit is not None and chunks.nbytes > limit:
        raise InputError(
            f"return_actions_by_depth: {chunks.shape[0]} candidates x {chunks.shape[1]} entries of chunks make "
            f"{chunks.nbytes} bytes, above the {limit} bytes a client decodes in one array; ask without it",
            field="return_actions_by_depth",
        )
    return chunks


def _finite_for_wire(actions: np.ndarray) -> np.ndarray:
    """float32 actions with zeros where they were not computed in time (NaN), or not finite (a failing network's, whose
    candidate is ranked out): the wire's arrays are finite, and a client restores the gaps (`sampled_chunks`)."""
    wire = actions.astype(np.float32)
    wire[~np.isfinite(wire)] = 0.0
    return wire


def sampled_chunks(reply: ActReply) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The reply's `candidate_actions` and `candidate_actions_by_depth` with NaN where no chunk is listed (they travel
    as zeros): a chunk whose value is null (not sampled in time, or its candidate ranked out for a non-finite output),
    except the base candidate's first-level chunk of a reply that answered with it unranked (`PlanningOutcome.REACTIVE`:
    the reply's own chunk, finite)."""
    values, by_depth = reply.candidate_values, reply.candidate_values_by_depth
    unranked = reply.planning == PlanningOutcome.REACTIVE.value
    actions = reply.candidate_actions
    if actions is not None and values is not None:
        actions = actions.copy()
        actions[[value is None and not (index == 0 and unranked) for index, value in enumerate(values)]] = np.nan
    chunks = reply.candidate_actions_by_depth
    if chunks is not None and by_depth is not None:
        chunks = chunks.copy()
        missing = np.array([[value is None for value in row] for row in by_depth])
        missing[0, 0] &= not unranked
        chunks[missing] = np.nan
    return actions, chunks
