"""The planning options on the command line: one `--kebab-case` flag per official `DeployConfig` field, over a preset.

Shared by `act --mode planning` and `serve`; the flags are generated from `PlanningConfig`, so the two commands and
the configuration cannot drift apart. A flag left out keeps the preset's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum

from cosmos_edge.cli.arg_types import positive_int, positive_milliseconds
from cosmos_edge.runtime.policy.planning_config import PRESETS, PlanningConfig, planning_preset

_FIELDS = dataclasses.fields(PlanningConfig)


def add_planning_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "planning", "best-of-N planning; the options of the official ALOHA deploy.py, by the same names"
    )
    group.add_argument(
        "--planning-preset",
        choices=sorted(PRESETS),
        default="main",
        help="main: the official main planning config (V(s'), 3 x 5 ensembles, best of 8); depth3: search depth 3 "
        "without ensembles; base: one candidate ranked by its own action pass",
    )
    defaults = PRESETS["main"]
    for field in _FIELDS:
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = f"official {field.name} (main preset: {getattr(default, 'value', default)})"
        if field.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, enum.Enum):
            group.add_argument(flag, choices=[member.value for member in type(default)], help=help_text)
        else:  # every int option is a count
            group.add_argument(flag, type=positive_int, help=help_text)
    group.add_argument(
        "--num-candidates", dest="num_queries_best_of_n", type=positive_int, help="the same as --num-queries-best-of-n"
    )
    group.add_argument(
        "--planning-deadline-ms",
        type=positive_milliseconds,
        help="answer a planning query within this many ms of its start (plus the DiT call in flight): the best "
        "candidate scored by then, or the base candidate's unranked action pass; the reply says which. With a "
        "deadline each device scores its candidates one at a time instead of as one batch (default: none)",
    )


def planning_config(args: argparse.Namespace, **replaced: object) -> PlanningConfig:
    """The preset with every planning flag the user gave (and `replaced`) applied."""
    given = {field.name: getattr(args, field.name) for field in _FIELDS if getattr(args, field.name) is not None}
    return planning_preset(args.planning_preset, **(given | replaced))


def planning_flags_given(args: argparse.Namespace) -> list[str]:
    """The planning flags on the command line (a preset other than the default counts as one)."""
    flags = [f"--{field.name.replace('_', '-')}" for field in _FIELDS if getattr(args, field.name) is not None]
    flags += ["--planning-deadline-ms"] if args.planning_deadline_ms is not None else []
    return flags + (["--planning-preset"] if args.planning_preset != "main" else [])
