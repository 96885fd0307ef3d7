"""When and how long to wait before trying a provider again: exponential backoff with jitter,
and the provider's own `Retry-After` honoured, as plain functions."""

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # in all, the first one included
    max_wait: float = 30.0  # a Retry-After longer than this is not waited for
    base_delay: float = 0.25

    def wait_before(self, attempt: int, retry_after: str | None, rng: random.Random = random) -> float | None:
        """Seconds to wait before attempt number `attempt` (2, 3, …), or None to stop."""
        if attempt > self.attempts:
            return None
        asked = retry_after_seconds(retry_after)
        if asked is not None:
            return asked if asked <= self.max_wait else None
        return min(self.max_wait, self.base_delay * 2 ** (attempt - 2)) * rng.uniform(0.5, 1.5)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())
