"""Wallets under load and across crashes: holds keep the balance from going below zero, and a
restart leaves no hold open and no row pending (SPEC §3.2, §3.6)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import openai

from meterproxy.store import INTERRUPTED
from pricing.fees import ProductFees
from tests.harness import Gateway, make_account

MESSAGES = [{"role": "user", "content": "one more question"}]


def client_for(gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0, timeout=30)


def test_fifty_concurrent_requests_on_a_wallet_that_affords_about_ten(gateway, fake):
    account = make_account(gateway.store, ProductFees(fixed_fee=Decimal("0.01")), balance=Decimal("0.105"))
    start = gateway.store.wallet_balance(account.wallet_id)
    fake.behave(*[{"first_byte_delay": 0.3}] * 50)  # keep them in flight together
    lowest = [start]
    running = threading.Event()
    running.set()

    def watch_balance() -> None:
        while running.is_set():
            lowest[0] = min(lowest[0], gateway.store.wallet_balance(account.wallet_id))
            time.sleep(0.005)

    def one_request(_: int) -> str | int:
        try:
            raw = client_for(gateway, account.token()).chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
            )
            return raw.headers["x-lava-request-id"]
        except openai.APIStatusError as refused:
            assert refused.code == "insufficient_balance"
            return refused.status_code

    watcher = threading.Thread(target=watch_balance)
    watcher.start()
    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(one_request, range(50)))
    running.clear()
    watcher.join()

    served = [outcome for outcome in outcomes if isinstance(outcome, str)]
    refused = [outcome for outcome in outcomes if outcome == 402]
    assert len(served) + len(refused) == 50
    # Each costs a little over $0.01 and holds a little more: ten fit, and never an eleventh.
    assert len(served) == 10
    rows = [gateway.row(request_id) for request_id in served]
    assert all(row["status"] == "completed" for row in rows)
    assert len([row for row in gateway.rows() if row["connection_id"] == account.connection_id]) == len(served)
    end = gateway.store.wallet_balance(account.wallet_id)
    assert min(lowest[0], end) >= 0
    assert sum(Decimal(row["wallet_cost"]) for row in rows) == start - end
    assert gateway.store.wallet(account.wallet_id)["held"] == "0.0000000000"


def test_a_restart_after_sigkill_leaves_no_hold_open_and_no_row_pending(fake, tmp_path):
    gateway = Gateway(tmp_path, fake)
    account = make_account(gateway.store)
    balance = gateway.store.wallet_balance(account.wallet_id)
    fake.behave(*[{"hang": 30}] * 3)
    failures = []

    def call_until_killed() -> None:
        try:
            client_for(gateway, account.token()).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.APIConnectionError as gone:
            failures.append(gone)

    calls = [threading.Thread(target=call_until_killed) for _ in range(3)]
    for call in calls:
        call.start()
    deadline = time.monotonic() + 10
    while len(fake.requests()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(fake.requests()) == 3
    assert [row["status"] for row in gateway.rows()] == ["pending"] * 3
    assert Decimal(gateway.store.wallet(account.wallet_id)["held"]) > 0

    gateway.process.kill()  # SIGKILL: no `done` hook, nothing flushed
    gateway.process.wait()
    for call in calls:
        call.join()
    assert len(failures) == 3
    gateway.stop()

    restarted = Gateway(tmp_path, fake)
    try:
        rows = restarted.rows()
        assert [(row["status"], row["error_message"], row["wallet_cost"]) for row in rows] == [
            ("error", INTERRUPTED, "0.0000000000")
        ] * 3
        wallet = restarted.store.wallet(account.wallet_id)
        assert (wallet["held"], Decimal(wallet["balance"])) == ("0.0000000000", balance)
        assert any("3 requests were interrupted" in line for line in restarted.output)
    finally:
        restarted.stop()
