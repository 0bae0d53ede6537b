"""At most one warning per interval for a recurring event of the control loop, with a count of those in between."""

from __future__ import annotations


class Throttle:
    """Decides which occurrences of one recurring event are warned about; owned by one thread."""

    def __init__(self, interval_s: float) -> None:
        self._interval_ns = interval_s * 1e9
        self._warned_at_ns: int | None = None
        self._events = 0  # since the last warning

    def due(self, now_ns: int) -> int | None:
        """Counts one event at `now_ns`: the events since the last warning (this one included) if a warning is due
        now, else None."""
        self._events += 1
        if self._warned_at_ns is not None and now_ns - self._warned_at_ns < self._interval_ns:
            return None
        events, self._events, self._warned_at_ns = self._events, 0, now_ns
        return events
