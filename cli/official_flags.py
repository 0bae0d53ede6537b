"""An official deploy.py command line's options, in the spellings cosmos-edge parses.

draccus spells each `DeployConfig` field `--snake_case VALUE`, booleans `True` or `False`. So that an official
command's options can be pasted as they are, `parseable_flags` rewrites the planning ones (and `use_variance_scale`)
as the `--kebab-case` flags that parse them, and takes `True`/`False` after a `--kebab-case` boolean too. Of the other
fields an ALOHA command sets, those that name the pipeline cosmos-edge computes are accepted at the documented
commands' values (and dropped), the one that only schedules the official server's work is dropped, and those given to
cosmos-edge another way (files, GPUs) are refused, naming the flag that takes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.planning_config import PlanningConfig

_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}

# Planning fields by official name: whether each is a boolean.
_PLANNING = {field.name: field.type == "bool" for field in dataclasses.fields(PlanningConfig)}
_PLANNING["use_variance_scale"] = True
_KEBAB_BOOLEANS = frozenset(name.replace("_", "-") for name, boolean in _PLANNING.items() if boolean)

# deploy.py's `DeployConfig` fields (lines 196-240) as its documented ALOHA commands (lines 26-137) set them: the
# pipeline cosmos-edge computes for ALOHA. Only names no cosmos-edge flag has (`--seed` is one of its own, and
# `--config` of `checkpoint random`).
_COMPUTED = {
    "model_family": "cosmos",
    "use_third_person_image": "True",
    "num_third_person_images": "1",
    "use_wrist_image": "True",
    "num_wrist_images": "2",
    "use_proprio": "True",
    "flip_images": "False",
    "use_jpeg_compression": "False",
    "unnormalize_actions": "True",
    "normalize_proprio": "True",
    "trained_with_image_aug": "True",
    "chunk_size": "50",
    "num_open_loop_steps": "50",
    "deterministic": "True",
}
# cosmos-edge batches the candidates and spreads them over `--devices` whatever this says.
_SCHEDULING = frozenset({"use_parallel_inference"})
_GIVEN_OTHERWISE = {
    "ckpt_path": "--checkpoint, the DiT's .pt file",
    "config_file": "nothing: cosmos-edge reads the networks' configuration from their weights",
    "planning_model_ckpt_path": "--planning-checkpoint, the planning DiT's .pt file",
    "planning_model_config_name": "nothing: cosmos-edge reads the networks' configuration from their weights",
    "dataset_stats_path": "--stats",
    "t5_text_embeddings_path": "--text-embeddings (convert the official pickle once: cosmos-edge text-embeddings "
    "convert)",
    "available_gpus": "--devices (serve) or --device (act)",
    "parallel_timeout": "--planning-deadline-ms (one deadline for the whole query, answered with the best so far)",
}

_OFFICIAL = frozenset(_PLANNING) | frozenset(_COMPUTED) | _SCHEDULING | frozenset(_GIVEN_OTHERWISE)


def parseable_flags(argv: Sequence[str]) -> list[str]:
    """`argv` with the official spellings of the planning options (`--num_queries_best_of_n 8`,
    `--ar_value_prediction True`, `--search_depth=3`) and `--kebab-case` booleans followed by a value
    (`--ar-value-prediction False`) rewritten as the flags that parse them (`--num-queries-best-of-n 8`,
    `--ar-value-prediction`, `--no-ar-value-prediction`), and the other official settings checked and dropped.
    `ConfigError` names the option as given: a boolean's value other than True or False (or yes/no, 1/0), an
    official setting at a value cosmos-edge does not compute, or one cosmos-edge takes as another flag."""
    rewritten: list[str] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        position += 1
        if token == "--":  # what follows is no option
            return [*rewritten, token, *argv[position:]]
        name, equals, value = token.partition("=")
        option = name[2:] if name.startswith("--") else ""
        snake = option if option in _OFFICIAL else ""
        if snake in _GIVEN_OTHERWISE:
            raise ConfigError(
                f"{name}: an official deploy.py option; cosmos-edge takes it as {_GIVEN_OTHERWISE[snake]}"
            )
        if snake in _COMPUTED or snake in _SCHEDULING:
            position = _checked_setting(argv, position, name, snake, value if equals else None)
        elif snake in _PLANNING and not _PLANNING[snake]:  # argparse takes its value
            rewritten.append(_flag(snake) + equals + value)
        elif snake in _PLANNING:
            if not equals:
                value, position = _next_value(argv, position, boolean=True)
            rewritten.append(_boolean_flag(snake, _boolean(name, value)))
        elif option in _KEBAB_BOOLEANS and (equals or _is_boolean(argv[position] if position < len(argv) else "")):
            value, position = (value, position) if equals else (argv[position], position + 1)
            rewritten.append(_boolean_flag(option.replace("-", "_"), _boolean(name, value)))
        else:
            rewritten.append(token)
    return rewritten


def _checked_setting(argv: Sequence[str], position: int, name: str, option: str, value: str | None) -> int:
    """Checks the non-planning official `option` given as `name` (with `value` after `=`, else the next token's);
    returns the position after it, as it is dropped."""
    boolean = option in _SCHEDULING or _COMPUTED[option] in ("True", "False")
    if value is None:
        value, position = _next_value(argv, position, boolean)
    if not value:
        expected = _COMPUTED.get(option, "True or False")
        raise ConfigError(f"{name}: expected a value after it (the official commands give {expected})")
    if option in _COMPUTED:
        _check_computed(name, option, value)
    else:
        _boolean(name, value)
    return position


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _boolean_flag(name: str, value: bool) -> str:
    return _flag(name) if value else "--no-" + _flag(name)[2:]


def _is_boolean(token: str) -> bool:
    return token.lower() in _BOOLEANS


def _next_value(argv: Sequence[str], position: int, boolean: bool) -> tuple[str, int]:
    """The value of an official option given without `=`, and the position after it: the next token unless it is
    an option. A boolean alone means True (a word after it that is no boolean is then refused, not skipped); another
    field alone has none ("")."""
    following = argv[position] if position < len(argv) else ""
    if following and not following.startswith("-"):
        return following, position + 1
    return ("True" if boolean else ""), position


def _boolean(name: str, value: str) -> bool:
    known = _BOOLEANS.get(value.lower())
    if known is None:
        kebab = _flag(name[2:])
        raise ConfigError(f"{name}: expected True or False after it (or {kebab} / --no-{kebab[2:]}), got {value!r}")
    return known


def _check_computed(name: str, option: str, value: str) -> None:
    expected = _COMPUTED[option]
    same = _BOOLEANS.get(value.lower()) == _BOOLEANS[expected.lower()] if expected in ("True", "False") else None
    if same is None:
        same = value == expected
    if not same:
        raise ConfigError(
            f"{name} {value}: an official deploy.py setting; cosmos-edge computes the official ALOHA pipeline, "
            f"that is {name} {expected}"
        )
