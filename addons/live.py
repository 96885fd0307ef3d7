"""The dashboard's live view: the rows of the calls that have just completed, for the pages
that wait for them (server-sent events, `addons/dashboard.py`).

Each completed row is kept here, in memory, in a ring of the last MAX_KEPT, with the moment it
was published; a page asks for the rows after the last moment it saw (its event id: seconds
since the epoch) and waits until one comes. Publishing costs a completion an append, and waking
the pages that wait. Rows are those this gateway process completed. Event ids are moments rather
than a count of this process's own, so that a page whose requests reach several worker
processes (`--workers`) moves on from one to the other without starting over.
"""

import asyncio
import math
import time
from collections import deque

MAX_KEPT = 2000


class LiveFeed:
    def __init__(self) -> None:
        self.latest = 0.0  # when the last row was published: moments only ever grow
        self._rows: deque[tuple[float, dict]] = deque(maxlen=MAX_KEPT)
        self._waiting: list[asyncio.Future] = []

    def publish(self, row: dict) -> None:
        self.latest = max(time.time(), self.latest + 1e-6)
        self._rows.append((self.latest, row))
        waiting, self._waiting = self._waiting, []
        for page in waiting:
            if not page.done():
                page.set_result(None)

    def now(self) -> float:
        """Where a new page starts: after everything published so far."""
        return max(time.time(), self.latest)

    @staticmethod
    def position(event_id: str | None) -> float | None:
        """The moment an event id names, or None."""
        try:
            moment = float(event_id or "")
        except ValueError:
            return None
        return moment if math.isfinite(moment) else None

    def after(self, moment: float, merchant_id: str | None) -> list[tuple[float, dict]]:
        """The rows published after `moment` that `merchant_id` may see (every row for None,
        the operator), with their moments."""
        if moment >= self.latest:
            return []
        return [
            (published, row)
            for published, row in self._rows
            if published > moment and (merchant_id is None or row.get("merchant_id") == merchant_id)
        ]

    async def wait(self, moment: float, merchant_id: str | None, timeout: float) -> tuple[list[dict], float]:
        """The rows after `moment` that `merchant_id` may see, once there are some or after
        `timeout` seconds; and the moment of the last of them (`moment` if none)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.after(moment, merchant_id)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return [row for _, row in found], found[-1][0] if found else moment
            page = asyncio.get_running_loop().create_future()
            self._waiting.append(page)
            try:
                await asyncio.wait_for(page, remaining)
            except TimeoutError:
                if page in self._waiting:
                    self._waiting.remove(page)
