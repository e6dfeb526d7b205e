"""Per-org request rate limits with OpenAI's ``x-ratelimit-*`` headers.

A token bucket per org, refilled continuously: ``requests_per_minute`` tokens per minute, burst
of the same size. In-process: with several API replicas each enforces its own share, which is
the usual trade-off for a limit that protects the service rather than bills anyone.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class Decision:
    """Outcome of one request against the bucket."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers (plus ``retry-after`` when refused)."""
        out = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": f"{self.reset_seconds:.3f}s",
        }
        if not self.allowed:
            out["retry-after"] = str(max(1, math.ceil(self.reset_seconds)))
        return out


class RateLimiter:
    """Token buckets keyed by org."""

    def __init__(self, requests_per_minute: int) -> None:
        self.limit = requests_per_minute
        self._rate = requests_per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._now = time.monotonic

    def check(self, org: str) -> Decision:
        """Take one token for ``org`` if there is one."""
        with self._lock:
            now = self._now()
            tokens, last = self._buckets.get(org, (float(self.limit), now))
            tokens = min(float(self.limit), tokens + (now - last) * self._rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[org] = (tokens, now)
            missing = max(0.0, 1.0 - tokens) if not allowed else max(0.0, self.limit - tokens)
            reset = missing / self._rate
            return Decision(allowed, self.limit, int(tokens), reset)
