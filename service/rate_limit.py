"""Optional per-key rate limit: a token bucket per API key, refilled continuously."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """Allow ``per_minute`` requests per key on average, with bursts up to ``per_minute``.

    Args:
        per_minute: sustained rate and bucket size.
    """

    def __init__(self, per_minute: int):
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, now: float | None = None) -> float:
        """Take a token for ``key``; 0 when allowed, else seconds until one is free."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
