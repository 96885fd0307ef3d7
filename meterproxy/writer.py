"""The gateway's one database thread, so that SQLite never blocks mitmproxy's event loop.

Jobs (functions of a `Store`) queue up and run in batches: one transaction per batch, each job
in its own savepoint so a failing job takes nothing else with it. A job's future resolves only
after its batch has committed, so an awaited `pending` row is on disk before the call goes out.
"""

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from meterproxy.store import Store

T = TypeVar("T")
COMMIT_ATTEMPTS = 5
log = logging.getLogger(__name__)
_STOP = object()


class LedgerWriter:
    def __init__(self, path: str | Path, max_batch: int = 512):
        self.path = path
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started = Future()
        self._thread = threading.Thread(target=self._run, name="meterproxy-ledger", daemon=True)
        self._thread.start()
        self._started.result()  # raise here if the database cannot be opened

    def submit(self, job: Callable[[Store], T]) -> "Future[T]":
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    async def call(self, job: Callable[[Store], T]) -> T:
        return await asyncio.wrap_future(self.submit(job))

    def stop(self) -> None:
        """Finish every queued job, then close the database."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        try:
            store = Store(self.path)
        except Exception as error:
            self._started.set_exception(error)
            return
        self._started.set_result(None)
        stopping = False
        while not stopping:
            batch = [self._jobs.get()]
            while len(batch) < self.max_batch and not self._jobs.empty():
                batch.append(self._jobs.get_nowait())
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
                while not self._jobs.empty():
                    batch.append(self._jobs.get_nowait())
            if batch:
                self._run_batch(store, batch)
        store.close()

    def _run_batch(self, store: Store, batch: list) -> None:
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                outcomes = self._transact(store, batch)
                break
            except sqlite3.OperationalError as error:  # locked or busy past busy_timeout: nothing happened
                log.warning("ledger batch not committed (%s), attempt %d of %d", error, attempt, COMMIT_ATTEMPTS)
                outcomes = [(False, error)] * len(batch)
                time.sleep(0.1 * attempt)
            except Exception as error:
                log.exception("ledger batch failed")
                outcomes = [(False, error)] * len(batch)
                break
        for (_, future), (ok, value) in zip(batch, outcomes):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    def _transact(store: Store, batch: list) -> list[tuple[bool, object]]:
        """Run the batch in one transaction, each job in its own savepoint."""
        outcomes = []
        with store.transaction():
            for job, _ in batch:
                try:
                    with store.db.atomic():
                        outcomes.append((True, job(store)))
                except sqlite3.OperationalError:
                    raise  # the database itself: retry the whole batch
                except Exception as error:
                    outcomes.append((False, error))
        return outcomes
