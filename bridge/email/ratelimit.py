"""Sliding-window rate limits for inbound mail (per sender, per recipient)."""

from __future__ import annotations

import time
from collections import deque


class SlidingWindow:
    """At most `limit` events per `window` seconds per key. In memory: a restart forgives."""

    def __init__(self, limit: int, window: float = 3600.0) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}

    def _prune(self, key: str, now: float) -> deque[float]:
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            # Keep memory bounded by active senders, not by every sender ever seen.
            self._events.pop(key, None)
            events = self._events.setdefault(key, deque())
        return events

    def allowed(self, key: str) -> bool:
        return len(self._prune(key, time.monotonic())) < self.limit

    def hit(self, key: str) -> None:
        self._prune(key, time.monotonic()).append(time.monotonic())

    def retry_after(self, key: str) -> int:
        """Seconds until one more event would be allowed."""
        events = self._prune(key, time.monotonic())
        if len(events) < self.limit:
            return 0
        return max(1, int(events[0] + self.window - time.monotonic()) + 1)
