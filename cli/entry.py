"""The `cosmos-edge` console script. Ctrl-C or SIGTERM before a command runs (its modules import for a fraction of a
second) ends it as it does later: one line, exit 130, no traceback."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def run() -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # as `main` handles it until a command takes the signals over
    try:
        from cosmos_edge.cli.main import main

        code = main()
    except KeyboardInterrupt:
        print("cosmos-edge: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
