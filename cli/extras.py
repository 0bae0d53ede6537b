"""Optional dependencies of the commands: torch, onnx and the simulator are extras, so that a bundle serves without
them. A command that needs a missing one says so in one line, before it does any work."""

from __future__ import annotations

import importlib

from cosmos_edge.runtime.errors import EngineError


def require_extra(command: str, extra: str, *modules: str) -> None:
    """Refuses `command` when one of `modules` (installed by the `extra` of cosmos-edge) cannot be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise EngineError(f"{command} needs {module} ({error}); pip install 'cosmos-edge[{extra}]'") from None
