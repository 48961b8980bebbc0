"""Per-key token buckets: ``rate`` tokens per second, at most ``burst`` stored; one request costs one (a
chat request of n choices n: its first when it arrives, the other n - 1 once its body is read).

``acquire(key, cost=1)`` takes ``cost`` tokens and returns 0 when the request may go ahead, else takes
nothing and returns the seconds until ``cost`` tokens are there (the caller answers 429 with
``Retry-After`` rounded up; a cost over ``burst`` can never be met, the caller refuses it first).
Buckets idle long enough to be full again are dropped, so memory stays bounded by the number of
recently active keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._last_sweep = clock()

    @property
    def is_enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str, cost: float = 1.0) -> float:
        if not self.is_enabled:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            self._sweep(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (cost - tokens) / self.rate

    @staticmethod
    def retry_after(wait_s: float) -> int:
        return max(1, math.ceil(wait_s))

    def _sweep(self, now: float) -> None:
        refill_s = self.burst / self.rate
        if now - self._last_sweep < refill_s:
            return
        self._last_sweep = now
        for key, (_, last) in list(self._buckets.items()):
            if now - last >= refill_s:
                del self._buckets[key]
