"""The gateway's own per-connection rate limits: requests and tokens per minute, from the
product, over a sliding one-minute window (SPEC §7: 429 with Retry-After)."""

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

WINDOW = 60.0


class ProductLimits(BaseModel):
    """0 means no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int = Field(0, ge=0)
    tokens_per_minute: int = Field(0, ge=0)

    @property
    def active(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    headers: dict[str, str]  # OpenAI's x-ratelimit-* headers, and Retry-After when refused


class Window:
    """One connection's requests of the last minute, with their tokens' total kept as requests
    come and go: no work per request that grows with the connection's rate."""

    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests: deque[tuple[float, int]] = deque()  # (moment, tokens)
        self.tokens = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0][0] <= now - WINDOW:
            self.tokens -= self.requests.popleft()[1]

    def add(self, now: float, tokens: int) -> None:
        self.requests.append((now, tokens))
        self.tokens += tokens


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._windows: dict[str, Window] = {}
        self._next_sweep = clock() + WINDOW

    def admit(self, key: str, limits: ProductLimits, tokens: int) -> Verdict:
        """Count a request of about `tokens` tokens against `key`'s window, if it fits."""
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        window = self._windows.setdefault(key, Window())
        window.expire(now)
        over_requests = limits.requests_per_minute and len(window.requests) + 1 > limits.requests_per_minute
        over_tokens = limits.tokens_per_minute and window.tokens + tokens > limits.tokens_per_minute
        allowed = not (over_requests or over_tokens)
        if allowed:
            window.add(now, tokens)
        reset = max(0.0, window.requests[0][0] + WINDOW - now) if window.requests else 0.0
        headers = {}
        if limits.requests_per_minute:
            remaining = limits.requests_per_minute - len(window.requests)
            headers |= _headers("requests", limits.requests_per_minute, remaining, reset)
        if limits.tokens_per_minute:
            headers |= _headers("tokens", limits.tokens_per_minute, limits.tokens_per_minute - window.tokens, reset)
        if not allowed:
            headers["retry-after"] = str(max(1, math.ceil(self._wait(window, limits, tokens, now))))
        return Verdict(allowed, headers)

    def _sweep(self, now: float) -> None:
        """Forget the connections that went quiet, once a minute, so that they are not kept forever."""
        for key, window in list(self._windows.items()):
            window.expire(now)
            if not window.requests:
                del self._windows[key]
        self._next_sweep = now + WINDOW

    @staticmethod
    def _wait(window: Window, limits: ProductLimits, tokens: int, now: float) -> float:
        """Seconds until enough of the window has passed for this request to fit."""
        used_tokens = window.tokens
        for index, (moment, count) in enumerate(window.requests):
            fits_requests = not limits.requests_per_minute or len(window.requests) - index <= limits.requests_per_minute
            used_tokens -= count
            fits_tokens = not limits.tokens_per_minute or used_tokens + tokens <= limits.tokens_per_minute
            if fits_requests and fits_tokens:
                return moment + WINDOW - now
        return WINDOW


def _headers(kind: str, limit: int, remaining: int, reset: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": f"{reset:.3f}s",
    }
