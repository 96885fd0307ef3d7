"""The gateway's database work, kept from ever blocking mitmproxy's event loop for long.

`LedgerWriter` runs the ledger's writes on the event loop itself. Jobs (functions of a `Store`)
submitted during one turn of the loop run together right after it: one transaction, in which a
failing job takes nothing else with it: a job either writes with one statement, its last (the
ledger's hot jobs, `atomic`), or runs in a savepoint of its own. A job's future resolves only
once its batch has committed, so an awaited `pending` row is on disk before the call goes out.
Completions, which nobody waits for, are posted: they gather for a few milliseconds and commit in
batches of their own, so that an admission never waits for another call's completion.
In WAL mode with `synchronous=NORMAL` a commit is a write to the operating system, tens of
microseconds: less than a hop to a thread and back would cost. What could take longer is kept
off the loop: a database locked by another process (an admin command) is tried again a little
later instead of waited for, and checkpoints (which fsync) run on the `StoreThread`.

A database that cannot be written (locked for longer than LOCKED_PATIENCE, or full, or failing)
fails the jobs somebody waits for, so that their calls are refused rather than forwarded
unrecorded; a full or failing one at once. Jobs that record what has happened (completions,
audit entries: every posted job, and the submitted ones marked `keep`) are never given up while
the gateway runs: they stay queued and are tried again until the database takes them.

`StoreThread` is one thread with its own connection for work that may take long and that no
call's admission waits on: the metering API's reports, the response cache's bodies, and a WAL
checkpoint every second.
"""

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

from meterproxy.store import Store

T = TypeVar("T")
log = logging.getLogger(__name__)
POSTED_DELAY = 0.005  # seconds a job nobody waits for may wait for company
LOCKED_PATIENCE = 30.0  # seconds a batch keeps trying while another process holds the lock
FIRST_RETRY = 0.002  # seconds before the first retry; then as long as the lock has lasted, up to MAX_RETRY
MAX_RETRY = 0.1
BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # another connection holds the lock: it will let go
CHECKPOINT_EVERY = 1.0  # seconds
_STOP = object()


class LedgerWriter:
    def __init__(self, path: str | Path, max_batch: int = 512):
        self.path = path
        self.max_batch = max_batch
        self.store = Store(path, busy_timeout=0, checkpoints=False)
        self._urgent: deque = deque()  # jobs somebody waits for, and audit entries
        self._posted: deque = deque()  # completions: nobody waits for them
        self._soon: asyncio.Handle | None = None  # the urgent jobs' run, next turn of the loop
        self._later: asyncio.Handle | None = None  # the posted jobs' run, or a retry of both
        self._retrying = False  # `_later` is a retry: it runs every queued job
        self._locked_since: float | None = None  # when the database stopped taking writes
        self._outage_told = False  # the log has said so
        self._stopping = False
        self.committed: Callable[[float], None] | None = None  # told how long each commit took (metrics)

    @property
    def queued(self) -> int:
        """Jobs waiting for their batch."""
        return len(self._urgent) + len(self._posted)

    def submit(self, job: Callable[[Store], T], atomic: bool = False, keep: bool = False) -> "asyncio.Future[T]":
        """Queue `job` for the end of this turn of the loop; its future resolves after commit.
        `atomic`: the job writes with one statement, its last, so that if it fails it has
        written nothing, and it needs no savepoint. `keep`: the job records what has happened,
        and waits out a database that cannot be written (see the module)."""
        future = asyncio.get_running_loop().create_future()
        self._urgent.append((job, future, atomic, keep))
        self._run_soon()
        return future

    def post(
        self,
        job: Callable[[Store], T],
        at_once: bool = False,
        atomic: bool = False,
        then: Callable[[T], None] | None = None,
    ) -> None:
        """Queue `job` with nobody waiting for it (a failure is logged). Unless `at_once`, it
        runs within POSTED_DELAY, in a batch of posted jobs only: a completion shares its commit
        with the completions of other calls, and never makes an admission wait for it. `then`
        is given the job's result once it has committed."""
        if at_once:
            self._urgent.append((job, then, atomic, True))
            self._run_soon()
            return
        self._posted.append((job, then, atomic, True))
        if self._later is None:
            self._later = asyncio.get_running_loop().call_later(POSTED_DELAY, self._run)

    def _run_soon(self) -> None:
        if self._soon is None and not self._retrying:  # a retry that is due runs them anyway
            self._soon = asyncio.get_running_loop().call_soon(self._run_urgent)

    async def call(self, job: Callable[[Store], T], atomic: bool = False) -> T:
        return await self.submit(job, atomic)

    def stop(self) -> None:
        """Commit every queued job, then close the database. A database that cannot be written
        is waited for as a locked one is, LOCKED_PATIENCE at most; then what is left is lost,
        and logged."""
        self._stopping = True
        for handle in (self._soon, self._later):
            if handle is not None:
                handle.cancel()
        self._soon = self._later = None
        for jobs in (self._urgent, self._posted):
            while jobs:
                if not self._flush(jobs):
                    time.sleep(FIRST_RETRY)
        self.store.close()

    def _run_urgent(self) -> None:
        self._soon = None
        self._drain(self._urgent)

    def _run(self) -> None:
        """The posted jobs' turn, or a retry after a lock: every queued job."""
        self._later, self._retrying = None, False
        if self._drain(self._urgent):
            self._drain(self._posted)

    def _drain(self, jobs: deque) -> bool:
        """Run `jobs` in batches; False if the database was locked, and then retry later."""
        while jobs:
            if not self._flush(jobs):
                if self._later is not None:
                    self._later.cancel()
                waited = time.monotonic() - self._locked_since
                delay = min(MAX_RETRY, max(FIRST_RETRY, waited))
                self._later, self._retrying = asyncio.get_running_loop().call_later(delay, self._run), True
                return False
        return True

    def _flush(self, jobs: deque) -> bool:
        """Run the next batch of `jobs`; False if the database was locked and it should be
        tried again."""
        batch = [jobs.popleft() for _ in range(min(self.max_batch, len(jobs)))]
        started = time.perf_counter()
        try:
            outcomes = self._transact(batch)
        except sqlite3.OperationalError as error:  # locked, busy, full or the disk: nothing happened
            return self._not_written(jobs, batch, error)
        except Exception as error:
            log.exception("ledger batch failed")
            outcomes = [(False, error)] * len(batch)
        if self.committed is not None:
            self.committed(time.perf_counter() - started)
        if self._outage_told:
            log.warning("the ledger database takes writes again")
        self._locked_since, self._outage_told = None, False
        self._resolve(batch, outcomes)
        return True

    def _not_written(self, jobs: deque, batch: list, error: sqlite3.OperationalError) -> bool:
        """A batch the database did not take: queued again, or failed (see the module); False
        if jobs wait to be tried again."""
        now = time.monotonic()
        if self._locked_since is None:
            self._locked_since = now
        busy = (error.sqlite_errorcode or 0) & 0xFF in BUSY  # the primary code of an extended one
        if (busy or self._stopping) and now - self._locked_since < LOCKED_PATIENCE:
            jobs.extendleft(reversed(batch))
            return False
        if not self._outage_told:
            log.error("the ledger database does not take writes (%s): calls are refused until it does", error)
            self._outage_told = True
        kept, failed = [], []
        for item in batch:
            _, _, _, keep = item
            (kept if keep and not self._stopping else failed).append(item)
        jobs.extendleft(reversed(kept))
        self._resolve(failed, [(False, error)] * len(failed))
        return not kept

    @staticmethod
    def _resolve(batch: list, outcomes: list) -> None:
        """Resolve the futures of the batch's jobs; log the failures of those nobody waits for,
        and tell the others' `then` their result."""
        for (_, future, _, _), (ok, value) in zip(batch, outcomes):
            if not isinstance(future, asyncio.Future):  # posted: nobody waits, or a `then`
                if not ok:
                    log.error("ledger job failed: %r", value)
                elif future is not None:
                    try:
                        future(value)
                    except Exception:
                        log.exception("after a ledger job")
            elif future.cancelled():
                continue  # whoever waited is gone; the job's work stands
            elif ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _transact(self, batch: list) -> list[tuple[bool, object]]:
        """Run the batch in one transaction, each job that is not atomic in a savepoint of its
        own: a job that fails takes nothing else with it."""
        store = self.store
        outcomes = []
        with store.transaction():
            for job, _, atomic, _ in batch:
                try:
                    with nullcontext() if atomic else store.savepoint():
                        outcomes.append((True, job(store)))
                except sqlite3.OperationalError:
                    raise  # the database itself: retry the whole batch
                except Exception as error:
                    outcomes.append((False, error))
        return outcomes


class StoreThread:
    """Jobs one at a time on a thread of their own, each in its own transaction (a writing
    job's takes the write lock up front, waiting for it if need be); a checkpoint every second."""

    def __init__(self, path: str | Path):
        self.path = path
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
        next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
        while True:
            try:
                item = self._jobs.get(timeout=max(0.0, next_checkpoint - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._run(store, *item)
            if time.monotonic() >= next_checkpoint:
                store.checkpoint()
                next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
        store.close()

    @staticmethod
    def _run(store: Store, job, future: Future, writes: bool) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with store.transaction(immediate=writes):
                result = job(store)
        except Exception as error:
            future.set_exception(error)
        else:
            future.set_result(result)
