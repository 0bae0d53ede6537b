"""The planning options on the command line: one `--kebab-case` flag per official `DeployConfig` field, over a preset.

Shared by `act --mode planning` and `serve`; the flags are generated from `PlanningConfig`, so the two commands and
the configuration cannot drift apart. A flag left out keeps the preset's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any

from cosmos_edge.cli.arg_types import int_in_range, positive_milliseconds
from cosmos_edge.cli.flag_names import naming_flags
from cosmos_edge.runtime.bundle.loader import bundle_batch_sizes, candidates_that_fit, planning_candidates
from cosmos_edge.runtime.bundle.sources import BundleSource, ModelSource
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.planning_config import (
    COUNT_LIMITS,
    PRESETS,
    SCHEME_CHOICES,
    PlanningConfig,
    planning_preset,
)

_FIELDS = dataclasses.fields(PlanningConfig)

_LOG = logging.getLogger(__name__)


def add_planning_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "planning", "best-of-N planning; the options of the official ALOHA deploy.py, by the same names"
    )
    group.add_argument(
        "--planning-preset",
        choices=sorted(PRESETS),
        help="(default: main) main: the official main planning config (V(s'), 3 x 5 ensembles, best of 8); "
        "depth3: search depth 3 without ensembles; base: one candidate ranked by its own action pass; "
        "deploy-defaults: the official DeployConfig's own defaults (the same as base), under which an official "
        "command's planning flags mean what they mean there. Every planning flag also takes its official spelling: "
        "--num_queries_best_of_n 8, --use_ensemble_value_predictions True",
    )
    defaults = PRESETS["main"]
    for field in _FIELDS:
        default = getattr(defaults, field.name)
        shown = "the platform's default action steps: 10 for ALOHA, 5 otherwise" if default is None else default
        preset = f"main preset: {getattr(shown, 'value', shown)}"
        if field.type == "bool":
            group.add_argument(
                _flag(field.name),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"official {field.name} ({preset})",
            )
        elif field.name in SCHEME_CHOICES:
            choices = [scheme.value for scheme in SCHEME_CHOICES[field.name]]
            group.add_argument(_flag(field.name), choices=choices, help=f"official {field.name} ({preset})")
        else:  # every int option is a count, given once (the candidates under either of their two names)
            limit = COUNT_LIMITS[field.name]
            aliases = ["--num-candidates"] if field.name == "num_queries_best_of_n" else []
            group.add_argument(
                _flag(field.name),
                *aliases,
                type=int_in_range(1, limit),
                metavar="N",
                action=_GivenOnce,
                help=f"official {field.name} ({preset}; 1..{limit})",
            )
    group.add_argument(
        "--planning-deadline-ms",
        type=positive_milliseconds,
        help="answer a planning query within this many ms of its start (plus the DiT call in flight): the best "
        "candidate scored by then, or the base candidate's unranked action pass; the reply says which. With a "
        "deadline each device scores its candidates one at a time instead of as one batch (default: none)",
    )


class _GivenOnce(argparse.Action):
    """Stores the value, refusing a second one for the same option (under either of its names)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"argument {'/'.join(self.option_strings)}: given twice; expected one value")
        setattr(namespace, self.dest, values)
        if option_string is not None:  # errors name the option as it was typed (an alias too)
            setattr(namespace, _TYPED, {**getattr(namespace, _TYPED, {}), self.dest: option_string})


def planning_config(args: argparse.Namespace, **replaced: object) -> PlanningConfig:
    """The preset with every planning flag the user gave (and `replaced`) applied; an error names the flags."""
    given = {field.name: getattr(args, field.name) for field in _FIELDS if getattr(args, field.name) is not None}
    try:
        config = planning_preset(_preset(args), **(given | replaced))
    except ConfigError as error:
        raise ConfigError(_as_typed(args, str(error))) from None
    by_reason: dict[str, list[str]] = {}
    for name, why in config.unused_options().items():
        if name in given and not _neutral(name, given[name]):
            by_reason.setdefault(_as_typed(args, why), []).append(_typed_flag(args, name))
    if by_reason:  # one line for all: an official command pasted whole may hold several
        _LOG.warning(
            "%s (with preset %s and the flags given)",
            "; ".join(
                f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect: {why}"
                for why, flags in by_reason.items()
            ),
            _preset(args),
        )
    return config


def _neutral(name: str, value: object) -> bool:
    """A value that asks for nothing an unused option could give: off, one (member, step), or DeployConfig's own
    default. The documented official commands give such values for the options their configuration leaves unused."""
    one = type(value) is int and value == 1
    return value is False or one or value == getattr(PRESETS["deploy-defaults"], name)


def _as_typed(args: argparse.Namespace, message: str) -> str:
    """`message` with each planning option's field name replaced by its flag, as the command line spelled it."""
    for field in _FIELDS:
        message = re.sub(rf"\b{field.name}\b", _typed_flag(args, field.name), message)
    return message


def _preset(args: argparse.Namespace) -> str:
    """The preset named, or the main one (None when not given: a preset given without planning is refused)."""
    return str(args.planning_preset or "main")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_TYPED = "planning_flags_typed"  # the parsed arguments' record of each planning option's spelling


def _typed_flag(args: argparse.Namespace, name: str) -> str:
    """The option of field `name` as the command line spelled it (`--num-candidates` for num_queries_best_of_n)."""
    return str(getattr(args, _TYPED, {}).get(name, _flag(name)))


def planning_flags_given(args: argparse.Namespace) -> list[str]:
    """The planning flags on the command line (a preset given counts as one, the default one included)."""
    flags = [_typed_flag(args, field.name) for field in _FIELDS if getattr(args, field.name) is not None]
    flags += ["--planning-deadline-ms"] if args.planning_deadline_ms is not None else []
    return flags + (["--planning-preset"] if args.planning_preset is not None else [])


def resolve_planning(
    args: argparse.Namespace, source: ModelSource, devices: list[str] | None
) -> tuple[PlanningConfig | None, str | None]:
    """The planning configuration a command runs: the preset with the flags given, at the number of candidates
    `source` can score over `devices` (a bundle's DiT batch sizes may allow fewer than the preset's: said in the
    log). None, and why with what would plan, when they allow none (a bundle only)."""
    preset = PRESETS[_preset(args)].num_queries_best_of_n
    one_at_a_time = args.planning_deadline_ms is not None
    count_flag = {"num_queries_best_of_n": _typed_flag(args, "num_queries_best_of_n")}
    with naming_flags(count_flag):
        candidates = planning_candidates(
            source, devices, args.num_queries_best_of_n, preset, one_at_a_time=one_at_a_time
        )
    if candidates is None:
        assert isinstance(source, BundleSource)  # checkpoint files plan with any number of candidates
        return None, no_planning(source, devices, preset)
    return planning_config(args, num_queries_best_of_n=candidates), None


def log_candidates(args: argparse.Namespace, planning: PlanningConfig) -> None:
    """Says how many candidates `planning` scores, and why when a bundle allows fewer than the preset's (after the
    other flags were checked: a note is not what a user should read above an error)."""
    preset = PRESETS[_preset(args)].num_queries_best_of_n
    candidates = planning.num_queries_best_of_n
    if candidates < preset and args.num_queries_best_of_n is None:
        _LOG.warning(
            "planning: best of %d, not the preset's %d: the bundle's DiT batch sizes allow no more", candidates, preset
        )
    else:
        _LOG.info("planning: best of %d candidate%s", candidates, "" if candidates == 1 else "s")


def no_planning(source: BundleSource, devices: list[str] | None, preset: int) -> str:
    """Why `planning_candidates` found no number of candidates (it tries the preset's down to 2), and what would."""
    workers = len(devices) if devices else 1  # the backend's default device
    larger = candidates_that_fit(source, devices)
    asks = f"--num-candidates {' or '.join(map(str, larger[:3]))}, " if larger else ""
    return (
        f"bundle {source.path} has DiT batch sizes {bundle_batch_sizes(source)}, which fit no best of 2 to {preset} "
        f"candidates over {workers} device(s); to plan, give {asks}--planning-deadline-ms (candidates then run one at "
        "a time, at batch 1), or re-export with --batch-sizes (e.g. 1,8)"
    )
