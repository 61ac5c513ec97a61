"""Sliding-window rate limits for inbound mail (per sender, per recipient, per peer address).

In memory and bounded: a restart forgives, and at most ``max_keys`` keys are tracked. Keys are
kept in the order they were last hit, so expired keys are found at the front and dropped as new
ones arrive; when every tracked key is still active and the table is full, the key hit longest
ago is forgotten (it is the one closest to expiring anyway).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

DEFAULT_MAX_KEYS = 100_000


def _monotonic() -> float:
    return time.monotonic()  # looked up at each call, so tests can move time


class SlidingWindow:
    """At most ``limit`` events per ``window`` seconds per key."""

    def __init__(
        self,
        limit: int,
        window: float = 3600.0,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = _monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        # key → its event times, oldest first; the dict itself is ordered by last hit.
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def _current(self, key: str, now: float) -> deque[float] | None:
        """The key's events still inside the window; None (and forgotten) when there are none."""
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]  # bounded by active keys, not by every key ever seen
            return None
        return events

    def allowed(self, key: str) -> bool:
        events = self._current(key, self._clock())
        return events is None or len(events) < self.limit

    def hit(self, key: str) -> None:
        now = self._clock()
        events = self._current(key, now)
        if events is None:
            self._make_room(now)
            events = self._events[key] = deque()
        else:
            self._events.move_to_end(key)
        events.append(now)
        while len(events) > self.limit:
            events.popleft()  # only the newest `limit` events can matter

    def retry_after(self, key: str) -> int:
        """Seconds until one more event would be allowed."""
        now = self._clock()
        events = self._current(key, now)
        if events is None or len(events) < self.limit:
            return 0
        return max(1, int(events[0] + self.window - now) + 1)

    def _make_room(self, now: float) -> None:
        # The front holds the keys hit longest ago: expired ones first, cheaply.
        while self._events:
            key, events = next(iter(self._events.items()))
            if events[-1] > now - self.window and len(self._events) < self.max_keys:
                return
            del self._events[key]
