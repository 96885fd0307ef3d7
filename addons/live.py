"""The dashboard's live view: the rows of the calls that have just completed, for the pages
that wait for them (server-sent events, `addons/dashboard.py`).

Each completed row is kept here, in memory, in a ring of the last MAX_KEPT; a page asks for the
rows after the last one it saw (its event id, `<boot>-<sequence>`) and waits until one comes.
Publishing costs a completion an append, and waking the pages that wait. Rows are those this
gateway process completed: a page shows the calls of the process that serves it.
"""

import asyncio
import secrets
import time
from collections import deque

MAX_KEPT = 2000


class LiveFeed:
    def __init__(self) -> None:
        self.boot = secrets.token_hex(4)  # a page's id from another run of the gateway means nothing here
        self.sequence = 0
        self._rows: deque[tuple[int, dict]] = deque(maxlen=MAX_KEPT)
        self._waiting: list[asyncio.Future] = []

    def publish(self, row: dict) -> None:
        self.sequence += 1
        self._rows.append((self.sequence, row))
        waiting, self._waiting = self._waiting, []
        for page in waiting:
            if not page.done():
                page.set_result(None)

    def cursor(self) -> str:
        return f"{self.boot}-{self.sequence}"

    def position(self, event_id: str | None) -> int | None:
        """The sequence number an event id of this run names, or None."""
        boot, _, sequence = (event_id or "").partition("-")
        if boot != self.boot or not sequence.isdigit():
            return None
        return min(int(sequence), self.sequence)

    def after(self, position: int, merchant_id: str | None) -> list[dict]:
        """The rows after `position` that `merchant_id` may see (every row for None, the operator)."""
        if position >= self.sequence:
            return []
        return [
            row
            for sequence, row in self._rows
            if sequence > position and (merchant_id is None or row.get("merchant_id") == merchant_id)
        ]

    async def wait(self, position: int, merchant_id: str | None, timeout: float) -> tuple[list[dict], str]:
        """The rows after `position` that `merchant_id` may see, once there are some or after
        `timeout` seconds; and the cursor they bring the page to."""
        deadline = time.monotonic() + timeout
        while True:
            rows, cursor = self.after(position, merchant_id), self.cursor()
            remaining = deadline - time.monotonic()
            if rows or remaining <= 0:
                return rows, cursor
            position = self.sequence  # what came so far was another merchant's
            page = asyncio.get_running_loop().create_future()
            self._waiting.append(page)
            try:
                await asyncio.wait_for(page, remaining)
            except TimeoutError:
                if page in self._waiting:
                    self._waiting.remove(page)
