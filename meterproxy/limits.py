"""The gateway's own per-connection rate limits: requests and tokens per minute, from the
product, over a sliding one-minute window (SPEC §7: 429 with Retry-After). The window is the
ledger's (the connection's admissions on every gateway, meterproxy/store.py); this module only
judges it."""

import math
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


class RateWindow:
    """One connection's admissions of the last minute, on every gateway (read from the ledger):
    whether one more of about `tokens` tokens fits, and the headers that say so."""

    SECONDS = WINDOW

    def __init__(self, admitted: list[tuple[float, int]]):
        self.admitted = sorted(admitted)  # (moment, tokens), the moments in seconds since the epoch

    def verdict(self, limits: ProductLimits, tokens: int, now: float) -> Verdict:
        recent = [entry for entry in self.admitted if entry[0] > now - WINDOW]
        used = sum(count for _, count in recent)
        over_requests = limits.requests_per_minute and len(recent) + 1 > limits.requests_per_minute
        over_tokens = limits.tokens_per_minute and used + tokens > limits.tokens_per_minute
        allowed = not (over_requests or over_tokens)
        if allowed:
            recent.append((now, tokens))
            used += tokens
        reset = max(0.0, recent[0][0] + WINDOW - now) if recent else 0.0
        headers = {}
        if limits.requests_per_minute:
            headers |= _headers("requests", limits.requests_per_minute, limits.requests_per_minute - len(recent), reset)
        if limits.tokens_per_minute:
            headers |= _headers("tokens", limits.tokens_per_minute, limits.tokens_per_minute - used, reset)
        if not allowed:
            headers["retry-after"] = str(max(1, math.ceil(_wait(recent, used, limits, tokens, now))))
        return Verdict(allowed, headers)


def _wait(recent: list[tuple[float, int]], used: int, limits: ProductLimits, tokens: int, now: float) -> float:
    """Seconds until enough of the window has passed for this request to fit."""
    for index, (moment, count) in enumerate(recent):
        fits_requests = not limits.requests_per_minute or len(recent) - index <= limits.requests_per_minute
        used -= count
        fits_tokens = not limits.tokens_per_minute or used + tokens <= limits.tokens_per_minute
        if fits_requests and fits_tokens:
            return moment + WINDOW - now
    return WINDOW


def _headers(kind: str, limit: int, remaining: int, reset: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": f"{reset:.3f}s",
    }
