"""Many gateways, one ledger (SPEC §9), on each backend: no wallet overdrawn by their
concurrency, rate limits and revocations that hold across all of them, and each gateway's
calls its own: a dead gateway's calls are interrupted once its lease expires, a live one's never."""

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from meterproxy.limits import ProductLimits
from meterproxy.store import INTERRUPTED
from pricing.fees import ProductFees
from tests.harness import ROOT, Gateway, make_account

MESSAGES = [{"role": "user", "content": "one more question"}]
FEE = Decimal("0.001")  # the whole cost of a BYOK call: held, then charged, exactly
LEASE = "2"  # seconds: a dead gateway's calls are interrupted soon after


def client_for(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0, timeout=30)


@pytest.fixture
def two(ledger, fake, tmp_path):
    """Two gateway processes on one ledger."""
    gateways = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateways.append(Gateway(tmp_path / name, fake, db=ledger, args=("--set", f"meterproxy_lease={LEASE}")))
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()


def wait_for(condition, what: str, timeout: float = 20) -> None:
    """Poll until `condition()`; the deadline only fails a hung test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_fifty_concurrent_requests_on_two_gateways_spend_exactly_what_the_wallet_has(two, fake):
    """The wallet affords exactly ten calls: ten are answered, forty refused with 402, whichever
    gateway they reach; the balance falls by exactly the completed rows' costs, never below zero."""
    first, second = two
    account = make_account(first.store, ProductFees(fixed_fee=FEE), balance=FEE * 10)
    token = account.token(provider_key="sk-customer-own-key-2c5e")
    fake.behave(*[{"first_byte_delay": 0.2}] * 50)  # keep them in flight together
    lowest = [FEE * 10]
    watching = threading.Event()

    def watch_balance() -> None:
        while not watching.is_set():
            lowest[0] = min(lowest[0], first.store.wallet_balance(account.wallet_id))
            time.sleep(0.005)

    def one_request(index: int) -> str | int:
        try:
            raw = client_for(two[index % 2], token).chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
            )
            return raw.headers["x-lava-request-id"]
        except openai.APIStatusError as refused:
            assert refused.code == "insufficient_balance", refused
            return refused.status_code

    watcher = threading.Thread(target=watch_balance)
    watcher.start()
    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(one_request, range(50)))
    watching.set()
    watcher.join()

    served = [outcome for outcome in outcomes if isinstance(outcome, str)]
    assert (len(served), outcomes.count(402)) == (10, 40)
    rows = [first.row(request_id) for request_id in served]
    assert {(row["status"], row["wallet_cost"]) for row in rows} == {("completed", f"{FEE:.10f}")}
    assert sorted(row["request_id"] for row in first.rows()) == sorted(served)  # a 402 writes no row
    wallet = first.store.wallet(account.wallet_id)
    spent = sum(Decimal(row["wallet_cost"]) for row in rows)
    assert (Decimal(wallet["balance"]), wallet["held"]) == (FEE * 10 - spent, "0.0000000000")
    assert Decimal(wallet["balance"]) == 0 and min(lowest) >= 0


def test_a_rate_limit_holds_for_the_sum_of_both_gateways(two):
    account = make_account(two[0].store, limits=ProductLimits(requests_per_minute=10))
    outcomes = []
    for index in range(20):
        try:
            client_for(two[index % 2], account.token()).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            outcomes.append(200)
        except openai.RateLimitError:
            outcomes.append(429)
    assert outcomes == [200] * 10 + [429] * 10


def test_a_revoked_connection_is_refused_by_every_gateway_within_a_second(two, ledger):
    account = make_account(two[0].store)
    clients = [client_for(gateway, account.token()) for gateway in two]
    for client in clients:  # both remember the principal now
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    admin = [Path(sys.executable).with_name("meterproxy"), "--db", ledger, "connection", "revoke", account.connection_id]
    subprocess.run(admin, check=True, cwd=ROOT, capture_output=True)
    revoked = time.monotonic()
    time.sleep(max(0.0, revoked + 1 - time.monotonic()))  # the promise: within a second
    for client in clients:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert refused.value.code == "invalid_connection"


def test_a_gateway_killed_mid_stream_leaves_the_other_serving_and_its_calls_interrupted_after_its_lease(two, fake):
    first, second = two
    account = make_account(first.store)
    balance = first.store.wallet_balance(account.wallet_id)
    fake.behave(*[{"chunk_delay": 0.2, "words": 40}] * 4)
    delivered: dict[int, list[str]] = {0: [], 1: [], 2: [], 3: []}

    def stream(index: int) -> str | None:
        client = client_for(two[index % 2], account.token())
        try:
            with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            ) as response:
                for chunk in response.parse():
                    if chunk.choices:
                        delivered[index].append(chunk.choices[0].delta.content or "")
                return response.headers["x-lava-request-id"]
        except openai.APIConnectionError:
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        streams = [pool.submit(stream, index) for index in range(4)]
        wait_for(lambda: all(len(pieces) >= 2 for pieces in delivered.values()), "four streams under way")
        first.process.kill()  # SIGKILL: no `done` hook, no lease renewed
        first.process.wait()
        outcomes = [call.result() for call in streams]
    assert outcomes[0] is None and outcomes[2] is None  # the dead one's clients saw the cut
    kept = [outcomes[1], outcomes[3]]
    assert all(kept)
    assert {second.row(request_id)["status"] for request_id in kept} == {"completed"}

    wait_for(lambda: not [row for row in second.rows() if row["status"] == "pending"], "the lease to expire")
    rows = second.rows()
    interrupted = [row for row in rows if row["request_id"] not in kept]
    assert [(row["status"], row["error_message"], row["wallet_cost"]) for row in interrupted] == [
        ("error", INTERRUPTED, "0.0000000000")
    ] * 2
    wallet = second.store.wallet(account.wallet_id)
    spent = sum(Decimal(second.row(request_id)["wallet_cost"]) for request_id in kept)
    assert (wallet["held"], Decimal(wallet["balance"])) == ("0.0000000000", balance - spent)


def test_a_gateway_restarted_while_the_other_serves_leaves_the_others_calls_alone(two, fake, ledger, tmp_path):
    first, second = two
    account = make_account(first.store)
    fake.behave({"first_byte_delay": 3})
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(
            client_for(second, account.token()).chat.completions.with_raw_response.create,
            model="gpt-4o-mini",
            messages=MESSAGES,
        )
        wait_for(lambda: fake.requests(), "the call to reach the provider")
        first.process.kill()
        first.process.wait()
        first.stop()
        restarted = Gateway(tmp_path / "a", fake, db=ledger, args=("--set", f"meterproxy_lease={LEASE}"))
        two[0] = restarted
        raw = in_flight.result()
    row = second.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["error_message"]) == ("completed", None)
