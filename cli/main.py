"""Entry point of the `cosmos-edge` command: builds the argument parser from the subcommand modules."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from cosmos_edge.cli import (
    act_cmd,
    checkpoint_cmd,
    client_cmd,
    demo_cmd,
    engines_cmd,
    export_cmd,
    keys_cmd,
    robot_cmd,
    serve_cmd,
    text_embeddings_cmd,
)
from cosmos_edge.cli.flag_names import naming_the_file_flag
from cosmos_edge.cli.official_flags import parseable_flags
from cosmos_edge.cli.signals import sigterm_interrupts
from cosmos_edge.robot_bridge.client import RemoteError
from cosmos_edge.robot_bridge.wire import REQUEST_FAULTS, MessageError
from cosmos_edge.runtime.errors import BundleError, CheckpointError, ConfigError, CosmosEdgeError, InputError
from cosmos_edge.runtime.files import PATH_FAULTS
from cosmos_edge.runtime.version import installed_version

DESCRIPTION = (
    "Deployment runtime for NVIDIA Cosmos Policy: run the official checkpoints exactly and fast (torch, ONNX Runtime, "
    "TensorRT), serve them to robot controllers over ZeroMQ or the official HTTP /act, and drive an ALOHA arm "
    "smoothly and safely. Start with `cosmos-edge demo` (no download)."
)

# Each subcommand module exposes `register(subparsers)`; it sets `func(args) -> int` on its parser.
SUBCOMMANDS = (
    checkpoint_cmd,
    text_embeddings_cmd,
    export_cmd,
    engines_cmd,
    act_cmd,
    serve_cmd,
    client_cmd,
    robot_cmd,
    keys_cmd,
    demo_cmd,
)


USAGE_ERROR = 2  # what was given is wrong (a flag, a file, an observation, a request), as argparse's own errors
FAILURE = 1  # what failed while running: a backend, a missing extra, a server that is busy or gone, a timeout


class _DefaultsInHelp(argparse.HelpFormatter):
    """Shows an option's default after its help, unless the help already describes it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default == []  # appended to, or off
        silent = empty or action.default == argparse.SUPPRESS
        if "default" in text or silent or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as the other errors are: one `cosmos-edge: error:` line naming the command and the argument, and
    where the usage is, instead of the whole usage first. Subcommand parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("cosmos-edge").strip()
        where = f"{command}: " if command else ""
        chosen = re.match(r"argument \{.*invalid choice: '([^']*)'", message)  # of a command (not of an option)
        if chosen and not re.fullmatch(r"[a-z][a-z-]*", chosen[1]):  # an option's value, not a misspelt command
            message += f"; options go after the command they belong to ({self.prog} COMMAND [options])"
        self.exit(2, f"cosmos-edge: error: {where}{message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cosmos-edge", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    _configure_parsers(parser)
    return parser


def _configure_parsers(parser: argparse.ArgumentParser) -> None:
    """For every command and nested subcommand (registered by the modules): `_DefaultsInHelp`; the parser itself as
    `_command_parser`, so that an argument no parser takes is refused by the deepest command given; and a command of
    subcommands (`client`, `keys`, ...) requires one, named in the error."""
    parser.formatter_class = _DefaultsInHelp
    parser.set_defaults(_command_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = True
            action.metavar = action.metavar or "{" + ",".join(action.choices) + "}"
            for command in action.choices.values():
                _configure_parsers(command)


def _named_command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the deepest command `argv` names (before it is parsed), for an error found before parsing."""
    for token in argv:
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if commands is None:
            break
        parser = commands.choices.get(token, parser)
    return parser


def _configure_logging(verbose: bool) -> None:
    """cosmos-edge's own progress at INFO; other libraries' (MuJoCo's, OpenGL's, ...) from WARNING unless -v. A
    process that configured logging already (a host program, pytest) keeps its own, as `basicConfig` would."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("cosmos_edge").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    typed = list(sys.argv[1:] if argv is None else argv)
    try:
        flags = parseable_flags(typed)
    except ConfigError as error:
        _named_command_parser(parser, typed).error(str(error))
    args, unknown = parser.parse_known_args(flags)
    if unknown:
        parser = args._command_parser
        hint = " (-v/--verbose goes before the command)" if {"-v", "--verbose"} & set(unknown) else ""
        if set(unknown) & set(parser._option_string_actions) - {"-h", "--help"}:  # given before its command's name
            hint = f" (options go after the command they belong to: {parser.prog} [options])"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    _configure_logging(args.verbose)
    try:
        with sigterm_interrupts():  # a long command (serve, robot) takes the signals over for its run
            code = int(args.func(args))
        sys.stdout.flush()  # a reader gone shows here, in the handler below, rather than at the interpreter's exit
        return code
    except CosmosEdgeError as error:
        return _report(args, str(error), _exit_code(error))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what was interrupted cleans up on its way out (an export leaves
        # no bundle, an engine build a bundle that opens)
        print(f"cosmos-edge: interrupted ({args.command})", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output piped into a reader that stopped (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's flush at exit must not fail
        return 141  # as a shell reports SIGPIPE
    except OSError as error:  # a path the command checked or opened that the system refused (permissions, a full disk)
        logging.getLogger(__name__).debug("the system refused a call", exc_info=True)  # -v shows where
        where = f"{error.filename}: " if error.filename is not None else ""
        given = error.errno in PATH_FAULTS and _given_path(args, error.filename)
        return _report(args, f"{where}{error.strerror or error}", USAGE_ERROR if given else FAILURE)


def _given_path(args: argparse.Namespace, filename: object) -> bool:
    """Whether `filename` is a path the command was given, or lies under one."""
    if not isinstance(filename, str | os.PathLike):
        return False
    path = os.path.abspath(filename)
    given = [os.path.abspath(value) for value in vars(args).values() if isinstance(value, str | os.PathLike)]
    return any(path == value or path.startswith(value.rstrip(os.sep) + os.sep) for value in given)


def _report(args: argparse.Namespace, message: str, code: int) -> int:
    """One line naming the flag that gave the file the message names, if one did."""
    named = naming_the_file_flag(args, args._command_parser, message)
    one_line = " ".join(named.splitlines())  # a wrapped library message; other spacing is kept
    print(f"cosmos-edge: error: {one_line}", file=sys.stderr)
    return code


def _exit_code(error: CosmosEdgeError) -> int:
    if isinstance(error, ConfigError | InputError | CheckpointError | BundleError):
        return USAGE_ERROR
    if isinstance(error, RemoteError | MessageError) and error.code in REQUEST_FAULTS:  # refused there, or here
        return USAGE_ERROR
    return FAILURE


if __name__ == "__main__":
    sys.exit(main())
