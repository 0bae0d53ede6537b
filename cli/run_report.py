"""What a run of the chunk executor reports when it ends (`demo`, `robot`)."""

from __future__ import annotations

from dataclasses import asdict

from cosmos_edge.robot_bridge.controller.blending import BlendConfig, BlendScheme, summarize_boundaries
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor
from cosmos_edge.robot_bridge.controller.safety import SafetyFilter
from cosmos_edge.robot_bridge.controller.ticks import TickSummary


def print_run_report(executor: ChunkExecutor, safety: SafetyFilter, summary: TickSummary) -> None:
    """The executor's and the safety filter's counters, the ticks, and the chunk boundaries."""
    print("executor: " + ", ".join(f"{name}={value}" for name, value in asdict(executor.counters).items()))
    late = f", {summary.missed_ticks} more skipped (late)" if summary.missed_ticks else ""
    held = f"held position on {summary.hold_ticks} (before the first chunk, starved, or stopped)"
    print(f"ticks: {summary.ticks}{late}; {held}")
    print("safety interventions: " + ", ".join(f"{name}={value}" for name, value in asdict(safety.counters).items()))
    stats = summarize_boundaries(executor.boundaries())
    blend = executor.config.blend
    print(
        f"chunk boundaries: {stats.boundaries} ({_blend_text(blend)}); largest per-tick "
        f"change of the arm joints at a boundary, rad: hard switch p50 {stats.raw_jump_p50:.3f} max "
        f"{stats.raw_jump_max:.3f}, commanded p50 {stats.commanded_jump_p50:.3f} max {stats.commanded_jump_max:.3f}; "
        f"of the grippers (normalised opening; the hard switch between the chunks' targets, before the safety "
        f"filter clamps them to 0..1): hard switch max {stats.gripper_raw_jump_max:.3f}, commanded max "
        f"{stats.gripper_commanded_jump_max:.3f}; safety-limited ticks in the windows: {stats.safety_ticks} (the "
        "safety filter bounds each command's step from the measured pose, and from the last command unless the arm "
        "lags two steps or more behind it)"
    )


def _blend_text(blend: BlendConfig) -> str:
    if blend.scheme is BlendScheme.NONE:
        return "none: hard switches"
    return f"{blend.scheme.value}, {blend.window_ticks} ticks"
