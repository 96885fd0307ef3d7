"""Crash safety (SPEC §3.2, §3.6, §6): the gateway SIGKILLed with streams in flight or while its
writer commits, and the admin command writing to the same WAL database as a busy gateway.

Invariants after every restart: no row `pending`, no hold open, the rows that were pending at the
crash (and only those) are `error` / INTERRUPTED with zero costs, every other row is exactly as it
was, and the wallet has paid exactly the `wallet_cost` of its `completed` rows.

The tests hold no connection to the database while a gateway is killed, so the restart finds the
database as the crash left it (WAL and shared-memory index included); the crash state is read
from a copy of those files.
"""

import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx2
import openai
import pytest

from meterproxy.store import INTERRUPTED, Store
from pricing.fees import ProductFees
from tests.harness import Account, Gateway, make_account, run

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "one more question"}]
FEES = ProductFees(fixed_fee=Decimal("0.001"))
FUNDED = Decimal("100")  # far more than the holds of every request in flight together
ZERO_TEXT = "0.0000000000"
COSTS = ("total_cost", "wallet_cost", "merchant_cost")
RECOVERED_COLUMNS = ("status", "error_message", "completed_at", *COSTS)  # what recovery may change
SLOW_STREAM = {"chunk_delay": 0.05, "words": 600}  # thirty seconds a stream: the kill comes long before
STREAMS = 4
BIN = Path(sys.executable).parent


# --- the database, read with connections of our own ---------------------------------------------


@dataclass
class State:
    rows: dict[str, dict]  # request_id -> ledger row
    holds: dict[str, str]  # request_id -> amount held
    balances: dict[str, str]  # wallet id -> balance


def read_state(db: Path) -> State:
    """Ledger, holds and balances in one read transaction (one WAL snapshot)."""
    connection = sqlite3.connect(db, timeout=30)
    connection.row_factory = sqlite3.Row
    try:
        connection.execute("BEGIN")
        rows = {row["request_id"]: dict(row) for row in connection.execute("SELECT * FROM requests")}
        pending = connection.execute("SELECT request_id, held FROM requests WHERE status = 'pending'")
        holds = {row["request_id"]: row["held"] for row in pending}
        balances = {row["id"]: row["balance"] for row in connection.execute("SELECT id, balance FROM wallets")}
        connection.rollback()
    finally:
        connection.close()
    return State(rows, holds, balances)


def typed(row: dict) -> dict:
    """A row as stored: every value with its type, so that 1 and "1" or 0 and 0.0 differ."""
    return {name: (type(value).__name__, value) for name, value in row.items()}


def settled(db: Path) -> dict[str, dict]:
    """The rows no longer pending: what a crash must leave exactly as it is."""
    return {request_id: row for request_id, row in read_state(db).rows.items() if row["status"] != "pending"}


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll until `condition()` is truthy (the machine may be busy with other tests) and return it."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def wait_until_settled(db: Path) -> State:
    """The state once no row is pending (completions are committed off the event loop)."""

    def no_pending() -> State | None:
        state = read_state(db)
        return None if any(row["status"] == "pending" for row in state.rows.values()) else state

    return wait_for(no_pending, 10, "every row to settle")


def open_account(db: Path) -> Account:
    store = Store(db)
    try:
        return make_account(store, FEES, balance=FUNDED)
    finally:
        store.close()


# --- gateways that can be killed --------------------------------------------------------------------


@pytest.fixture
def launch(fake, tmp_path) -> Callable[[], Gateway]:
    """Start gateways on one database (tmp_path/ledger.sqlite); the test process keeps no
    connection to it. Whatever is still running at the end is stopped."""
    started: list[Gateway] = []

    def start() -> Gateway:
        gateway = Gateway(tmp_path, fake)
        gateway.store.close()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.stop()


def crash(gateway: Gateway, into: Path) -> State:
    """SIGKILL: no `done` hook, no writer drain, no checkpoint. Returns the database as the
    crash left it, read from a copy so that the restart still finds the original untouched."""
    gateway.process.kill()
    gateway.process.wait()
    into.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{gateway.db_path}{suffix}")
        if source.exists():
            shutil.copyfile(source, into / f"ledger.sqlite{suffix}")
    return read_state(into / "ledger.sqlite")


def interrupted_log(gateway: Gateway) -> list[str]:
    return [line for line in gateway.output if "requests were interrupted" in line]


# --- clients ---------------------------------------------------------------------------------


def client_for(gateway: Gateway, account: Account) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0, timeout=30)


def usage_body(account: Account) -> dict:
    """A metering-API create with our own request_id, so that an unanswered one can be retried."""
    return {
        "request_id": f"ext_{uuid.uuid4().hex}",
        "connection_secret": account.connection_secret,
        "product_secret": account.product_secret,
        "model": MODEL,
        "provider": "openai",
        "input_tokens": 1200,
        "output_tokens": 340,
    }


class Load:
    """Clients that keep calling one gateway until it is stopped or killed, and remember what
    they were told. Before `dying` is set, any failure is a failure of the test."""

    def __init__(self, gateway: Gateway, account: Account) -> None:
        self.gateway, self.account = gateway, account
        self.stopping = threading.Event()  # finish the call in hand, then stop
        self.dying = threading.Event()  # the gateway is about to be killed: errors are expected
        self.served: list[str] = []  # x-lava-request-id of forwarded calls answered 200
        self.created: list[str] = []  # request_id of metering-API creates answered 201
        self.unanswered: dict[str, dict] = {}  # creates sent and never answered
        self.streams: list[dict] = []
        self.unexpected: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def run(self, worker: Callable[[], None], count: int = 1) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self._guarded, args=(worker,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _guarded(self, worker: Callable[[], None]) -> None:
        try:
            worker()
        except Exception as error:
            if not self.dying.is_set():
                self.unexpected.append(error)

    def quick_calls(self) -> None:
        client = client_for(self.gateway, self.account)
        while not self.stopping.is_set():
            raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
            assert raw.http_response.status_code == 200
            self.served.append(raw.headers["x-lava-request-id"])

    def api_creates(self) -> None:
        headers = {"Authorization": f"Bearer {self.account.secret_key}"}
        with httpx2.Client(base_url=self.gateway.url, headers=headers, timeout=30) as http:
            while not self.stopping.is_set():
                body = usage_body(self.account)
                self.unanswered[body["request_id"]] = body
                response = http.post("/v1/requests", json=body)
                del self.unanswered[body["request_id"]]
                assert response.status_code == 201, response.text
                self.created.append(body["request_id"])

    def slow_stream(self) -> None:
        client = client_for(self.gateway, self.account)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=100, stream=True
        )
        stream = {"request_id": raw.headers["x-lava-request-id"], "pieces": 0, "finished": False}
        self.streams.append(stream)
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                stream["pieces"] += 1
        stream["finished"] = True

    def get_going(self) -> None:
        """Wait until calls of both kinds have been answered (the machine may be busy)."""
        wait_for(lambda: len(self.served) >= 5 and self.created or self.unexpected, 10, "the load to get going")
        assert not self.unexpected, self.unexpected

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in self.threads)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def kill_under_load(gateway: Gateway, load: Load, into: Path) -> tuple[dict[str, dict], State]:
    """Snapshot the settled rows, then SIGKILL with the load still running."""
    assert not load.unexpected, load.unexpected
    snapshot = settled(gateway.db_path)
    load.dying.set()
    crashed = crash(gateway, into)
    load.join()
    assert not load.unexpected, load.unexpected
    return snapshot, crashed


# --- the invariants --------------------------------------------------------------------------------


def assert_money(state: State, account: Account, funded: Decimal) -> None:
    """The wallet paid exactly the wallet_cost of its completed rows; nothing else charges."""
    rows = [row for row in state.rows.values() if row["wallet_id"] == account.wallet_id]
    assert all(row["wallet_cost"] == ZERO_TEXT for row in rows if row["status"] != "completed")
    spent = sum((Decimal(row["wallet_cost"]) for row in rows if row["status"] == "completed"), Decimal(0))
    assert spent > 0
    assert funded - Decimal(state.balances[account.wallet_id]) == spent


def assert_recovered(
    gateway: Gateway, crashed: State, snapshot: dict[str, dict], account: Account, funded: Decimal
) -> State:
    """The restarted gateway found the crashed database and left it consistent."""
    pending = {request_id for request_id, row in crashed.rows.items() if row["status"] == "pending"}
    # At the crash, a hold was open exactly for each request in flight.
    assert set(crashed.holds) == pending
    state = read_state(gateway.db_path)
    assert set(state.rows) == set(crashed.rows)  # the restart lost no row and made none up
    assert state.holds == {}
    assert [row["request_id"] for row in state.rows.values() if row["status"] == "pending"] == []
    for request_id, row in state.rows.items():
        before = crashed.rows[request_id]
        if request_id in pending:
            assert (row["status"], row["error_message"]) == ("error", INTERRUPTED)
            assert [row[name] for name in COSTS] == [ZERO_TEXT] * 3
            assert row["completed_at"] >= row["created_at"]
            kept = {name: value for name, value in typed(row).items() if name not in RECOVERED_COLUMNS}
            assert kept == {name: value for name, value in typed(before).items() if name not in RECOVERED_COLUMNS}
        else:
            assert typed(row) == typed(before), request_id
    for request_id, row in snapshot.items():  # settled before the kill: byte for byte the same
        assert typed(state.rows[request_id]) == typed(row), request_id
    assert_money(state, account, funded)
    if pending:
        assert any(re.search(rf"\b{len(pending)} requests were interrupted", line) for line in interrupted_log(gateway))
    else:
        assert interrupted_log(gateway) == []
    return state


def assert_told_truth(state: State, load: Load) -> None:
    """A 200 went out after the pending row was committed, possibly before the completion was:
    the row exists, completed or interrupted. A metering-API 201 went out after its commit."""
    for request_id in load.served:
        row = state.rows[request_id]
        assert row["status"] == "completed" or row["error_message"] == INTERRUPTED, row
    assert all(state.rows[request_id]["status"] == "completed" for request_id in load.created)


def assert_serves(gateway: Gateway, account: Account) -> State:
    """The restarted gateway serves and charges as before."""
    raw = client_for(gateway, account).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=5
    )
    state = wait_until_settled(gateway.db_path)
    assert state.rows[raw.headers["x-lava-request-id"]]["status"] == "completed"
    return state


# --- the tests ---------------------------------------------------------------------------------------


def test_sigkill_with_streams_in_flight_loses_nothing_and_charges_nothing_twice(launch, fake, tmp_path):
    gateway = launch()
    account = open_account(gateway.db_path)
    load = Load(gateway, account)
    fake.behave(*[SLOW_STREAM] * STREAMS)
    load.run(load.slow_stream, STREAMS)
    # Behaviours are FIFO: the quick calls start once every stream has taken its own.
    wait_for(lambda: len(load.streams) == STREAMS or load.unexpected, 10, "the streams to start")
    assert not load.unexpected and len(fake.requests()) == STREAMS
    load.run(load.quick_calls, 2)
    # The order of events, not seconds: ten quick calls settle while every stream is still going
    # (checked below, after the kill).
    wait_for(lambda: len(settled(gateway.db_path)) >= 10, 60, "ten quick calls to settle")

    snapshot, crashed = kill_under_load(gateway, load, tmp_path / "crashed")

    assert len(snapshot) >= 10 and load.served
    assert [stream["finished"] for stream in load.streams] == [False] * STREAMS
    assert all(0 < stream["pieces"] < SLOW_STREAM["words"] for stream in load.streams)
    streamed = {stream["request_id"] for stream in load.streams}
    assert {crashed.rows[request_id]["status"] for request_id in streamed} == {"pending"}

    restarted = launch()
    state = assert_recovered(restarted, crashed, snapshot, account, FUNDED)
    assert_told_truth(state, load)
    assert all(state.rows[request_id]["stream"] == 1 for request_id in streamed)
    assert_money(assert_serves(restarted, account), account, FUNDED)


@pytest.mark.parametrize("seed", [1913])
def test_sigkill_while_the_writer_commits_keeps_the_ledger_and_wallet_exact(launch, fake, tmp_path, seed):
    moments = random.Random(seed)
    gateway = launch()
    account = open_account(gateway.db_path)
    pending_at_crashes = []
    for cycle in range(3):
        load = Load(gateway, account)
        load.run(load.quick_calls, 4)
        load.run(load.api_creates, 2)
        load.get_going()
        time.sleep(moments.uniform(0, 0.6))

        snapshot, crashed = kill_under_load(gateway, load, tmp_path / f"crashed-{cycle}")
        pending_at_crashes.append(sum(row["status"] == "pending" for row in crashed.rows.values()))

        gateway = launch()
        state = assert_recovered(gateway, crashed, snapshot, account, FUNDED)
        assert_told_truth(state, load)
        # A client retries the creates it got no answer to: recorded at most once, never charged twice.
        with httpx2.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {account.secret_key}"}) as http:
            for request_id, body in load.unanswered.items():
                response = http.post("/v1/requests", json=body)
                assert response.status_code == (200 if request_id in state.rows else 201), response.text
        assert_money(wait_until_settled(gateway.db_path), account, FUNDED)
    assert any(pending_at_crashes), "no kill found a request in flight"


def meterproxy(db: Path, *args: str) -> subprocess.CompletedProcess:
    return run([BIN / "meterproxy", "--db", str(db), "--json", *args])


def test_admin_commands_beside_a_busy_gateway_never_see_database_is_locked(launch):
    gateway = launch()
    account = open_account(gateway.db_path)
    load = Load(gateway, account)
    load.run(load.quick_calls, 2)
    load.run(load.api_creates, 1)
    load.get_going()
    top_ups = [Decimal("0.1000000001") * k for k in range(1, 15)]
    commands = [
        *[("wallet", "top-up", account.wallet_id, str(amount)) for amount in top_ups],
        *[("wallet", "show", account.wallet_id)] * 2,
        ("report", "--by", "model"),
        ("report", "--by", "day"),
        *[("requests", "--limit", "50")] * 2,
    ]
    random.Random(7).shuffle(commands)  # reads and writes interleaved
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        results = list(pool.map(lambda command: meterproxy(gateway.db_path, *command), commands))
    load.stop()

    assert not load.unexpected, load.unexpected
    for command, result in zip(commands, results):
        assert (result.returncode, result.stderr) == (0, ""), (command, result.stderr)
        assert json.loads(result.stdout), command
    state = wait_until_settled(gateway.db_path)
    assert state.holds == {}
    assert_told_truth(state, load)
    assert_money(state, account, FUNDED + sum(top_ups))
