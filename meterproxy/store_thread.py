"""`StoreThread`: one thread with its own connection to the ledger, for work that may take long
and that no call's admission waits on: the metering API's reads and reports, the response
cache's bodies, the dashboard's pages, and periodic jobs (a SQLite WAL checkpoint every second,
the gateway's lease)."""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from meterproxy.database import LedgerUnavailable
from meterproxy.store import Store

T = TypeVar("T")
log = logging.getLogger(__name__)
CHECKPOINT_EVERY = 1.0  # seconds
_STOP = object()


class StoreThread:
    """Jobs one at a time on a thread of their own, each in its own transaction (a writing
    job's takes the write lock up front, waiting for it if need be); between them, the periodic
    jobs: a WAL checkpoint every second, and whatever `every` adds (the gateway's lease)."""

    def __init__(self, path: str | Path, every: tuple[tuple[float, Callable[[Store], object]], ...] = ()):
        self.path = path
        self._periodic = [(CHECKPOINT_EVERY, Store.checkpoint), *every]
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started: Future = Future()
        self._thread = threading.Thread(target=self._serve, name="meterproxy-store", daemon=True)
        self._thread.start()
        self._started.result()  # raise here if the database cannot be opened

    def submit(self, job: Callable[[Store], T], writes: bool = False) -> "Future[T]":
        future: Future = Future()
        self._jobs.put((job, future, writes))
        return future

    async def call(self, job: Callable[[Store], T], writes: bool = False) -> T:
        return await asyncio.wrap_future(self.submit(job, writes))

    def stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()

    def _serve(self) -> None:
        try:
            store = Store(self.path)
        except Exception as error:
            self._started.set_exception(error)
            return
        self._started.set_result(None)
        due = [time.monotonic() + period for period, _ in self._periodic]
        while True:
            try:
                item = self._jobs.get(timeout=max(0.0, min(due) - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._run(store, *item)
            for index, (period, job) in enumerate(self._periodic):
                if time.monotonic() >= due[index]:
                    self._periodically(store, job)
                    due[index] = time.monotonic() + period
        store.close()

    @staticmethod
    def _periodically(store: Store, job: Callable[[Store], object]) -> None:
        """A periodic job that fails is logged and tried again next time."""
        try:
            store.db.reconnect()
            job(store)
        except Exception as error:
            log.warning("%s failed: %r", getattr(job, "__name__", "a periodic ledger job"), error)
            store.db.rollback()

    @staticmethod
    def _run(store: Store, job, future: Future, writes: bool) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            store.db.reconnect()
            with store.transaction(immediate=writes):
                result = job(store)
        except store.db.unavailable as error:
            future.set_exception(LedgerUnavailable(str(error)))
        except Exception as error:
            future.set_exception(error)
        else:
            future.set_result(result)
