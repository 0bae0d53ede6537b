"""A log for what a hostile peer can make the server say: at most one line per peer per window, then a count; and
text from a peer made safe to put in a log line."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

_PLAIN = re.compile(r"[A-Za-z0-9_./\[\]-]{0,64}")  # what the protocol's own field names look like
_QUOTED_CHARS = 64


def peer_text(text: str) -> str:
    """`text` as it may appear in a log line: as is when it looks like a field name, otherwise quoted (newlines and
    control characters escaped, so a peer cannot forge a line) and cut to 64 characters."""
    if _PLAIN.fullmatch(text):
        return text
    shown = repr(text[:_QUOTED_CHARS])
    return shown + "..." if len(text) > _QUOTED_CHARS else shown


class RateLimitedLog:
    """Logs at most one line per peer, and `max_lines` in all, per `interval_s`; then one line counting the rest.

    For the refusals a server logs: a peer sending garbage as fast as it can must not fill the log or slow the
    serving. Lines go to `logger` (the log of the server that refuses). One owner thread per instance (the ZeroMQ
    I/O thread, the HTTP event loop): not thread-safe.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 1.0,
        max_lines: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._max_lines = max_lines
        self._clock = clock
        self._window_start = clock()
        self._peers: set[str] = set()
        self._held_back = 0

    def log(self, peer: str, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        self.tick()
        if peer in self._peers or len(self._peers) >= self._max_lines:
            self._held_back += 1
            return
        self._peers.add(peer)
        self._logger.log(level, message, *args, exc_info=exc_info)

    def tick(self) -> None:
        """Starts a new window once `interval_s` has passed, logging how many lines the last one held back."""
        now = self._clock()
        if now - self._window_start < self._interval_s:
            return
        if self._held_back:
            self._logger.info(
                "kind=error held_back=%d window_s=%.1f (at most one line per peer per %.1f s)",
                self._held_back,
                now - self._window_start,
                self._interval_s,
            )
        self._window_start, self._peers, self._held_back = now, set(), 0


class RepeatFilter(logging.Filter):
    """Lets each message (by its format string) through at most once per `interval_s`; the next one that passes says
    how many were held back. For a library's own lines that a peer can trigger at will (uvicorn's "Invalid HTTP
    request received"), which `RateLimitedLog` cannot wrap."""

    def __init__(self, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held_back: dict[str, int] = {}
        self._lock = threading.Lock()  # a library may log from several threads

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval_s:
                self._held_back[key] = self._held_back.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held_back.pop(key, 0)
        if held:  # appended after formatting: no % of it may meet the record's arguments
            record.msg, record.args = f"{record.getMessage()} ({held} more like it held back)", None
        return True
