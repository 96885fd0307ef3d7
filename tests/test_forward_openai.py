"""End to end: the official openai SDK → real mitmdump with the gateway → the fake provider.

Each test asserts what the client got, what the upstream saw and the exact ledger row, with
costs computed here independently from genai-prices and the product's fees.
"""

import base64
import json
import socket
import threading
import time
from decimal import ROUND_HALF_UP, Decimal

import genai_prices
import openai
import pytest

from meterproxy.store import PRINCIPAL_STALENESS
from meterproxy.token import encode_token
from pricing.fees import Payer, ProductFees
from tests.harness import MANAGED_KEYS, SELF_HOSTED, make_account, secret, wait_until

OPENAI_BASE = "https://api.openai.com/v1/"  # the SDK appends paths to it
MESSAGES = [{"role": "user", "content": "Say hello to the ledger"}]
PROMPT_TOKENS = 3 + 3 + 5  # the fake provider's documented formula
FEES = ProductFees(fixed_fee=Decimal("0.001"), markup_percent=Decimal("10"))
TEN_PLACES = Decimal("0.0000000001")


def dollars(value: Decimal) -> Decimal:
    return value.quantize(TEN_PLACES, rounding=ROUND_HALF_UP)


def expected_costs(model, input_tokens, output_tokens, cached=0, fees=FEES, mode="managed"):
    """total, wallet and merchant cost as SPEC §5 defines them, from genai-prices directly."""
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached)
    provider = dollars(genai_prices.calc_price(usage, model, provider_id="openai").total_price)
    if fees is None:
        return provider, Decimal(0), Decimal(0)
    fee = dollars(fees.fixed_fee + provider * fees.markup_percent / 100)
    wallet = {"managed": provider + fee, "byok": fee}[mode]
    return provider + fee, wallet, Decimal(0)


def as_text(value: Decimal) -> str:
    return f"{dollars(value):f}"


@pytest.fixture(scope="module")
def account(gateway):
    return make_account(gateway.store, FEES)


def client_for(gateway, token):
    return openai.OpenAI(base_url=gateway.forward_base(OPENAI_BASE), api_key=token, max_retries=0)


def upstream_auth(request):
    return [value for name, value in request["headers"] if name == "authorization"]


def test_non_streamed_managed_call_is_metered_priced_and_charged(gateway, fake, account):
    fake.behave({"cached_tokens": 4})
    balance_before = gateway.store.wallet_balance(account.wallet_id)
    token = account.token()
    raw = client_for(gateway, token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=7
    )
    completion = raw.parse()

    assert completion.choices[0].message.content == "w0 w1 w2 w3 w4 w5 w6"
    assert completion.usage.prompt_tokens == PROMPT_TOKENS and completion.usage.completion_tokens == 7
    [seen] = fake.requests()
    assert seen["path"] == "/openai/v1/chat/completions"
    assert upstream_auth(seen) == [f"Bearer {MANAGED_KEYS['OPENAI_API_KEY']}"]
    assert token not in json.dumps(seen)
    assert seen["body"] == {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 7}

    request_id = raw.headers["x-lava-request-id"]
    row = gateway.row(request_id)
    total, wallet, merchant = expected_costs("gpt-4o-mini", PROMPT_TOKENS, 7, cached=4)
    assert row == {
        **row,
        "request_id": request_id,
        "status": "completed",
        "provider": "openai",
        "endpoint": "POST https://api.openai.com/v1/chat/completions",
        "key_mode": "managed",
        "model": "gpt-4o-mini",
        "provider_response_id": completion.id,
        "connection_id": account.connection_id,
        "product_id": account.product_id,
        "merchant_id": account.merchant_id,
        "metadata": "{}",
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": 7,
        "cached_input_tokens": 4,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "usage_source": "provider",
        "stream": 0,
        "cache_hit": 0,
        "attempts": 1,
        "upstream_status": 200,
        "error_message": None,
        "total_cost": as_text(total),
        "wallet_cost": as_text(wallet),
        "merchant_cost": as_text(merchant),
    }
    assert wallet > 0 and row["latency_ms"] >= 0 and row["ttfb_ms"] >= 0
    assert row["created_at"] <= row["completed_at"] and row["created_at"].endswith("Z")
    assert gateway.store.wallet_balance(account.wallet_id) == balance_before - wallet


def test_streamed_call_gets_usage_without_the_client_seeing_the_usage_chunk(gateway, fake, account):
    balance_before = gateway.store.wallet_balance(account.wallet_id)
    client = client_for(gateway, account.token())
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as response:
        request_id = response.headers["x-lava-request-id"]
        chunks = list(response.parse())

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "w0 w1 w2 w3 w4"
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)  # no usage-only chunk
    [seen] = fake.requests()
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert upstream_auth(seen) == [f"Bearer {MANAGED_KEYS['OPENAI_API_KEY']}"]

    row = gateway.row(request_id)
    total, wallet, _ = expected_costs("gpt-4o-mini", PROMPT_TOKENS, 5)
    assert (row["status"], row["stream"], row["input_tokens"], row["output_tokens"]) == (
        "completed",
        1,
        PROMPT_TOKENS,
        5,
    )
    assert (row["total_cost"], row["wallet_cost"]) == (as_text(total), as_text(wallet))
    assert row["provider_response_id"] == chunks[0].id
    assert gateway.store.wallet_balance(account.wallet_id) == balance_before - wallet


def test_a_client_that_asks_for_stream_usage_still_gets_it(gateway, fake, account):
    client = client_for(gateway, account.token())
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as response:
        request_id = response.headers["x-lava-request-id"]
        chunks = list(response.parse())

    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert gateway.row(request_id)["output_tokens"] == 5


def test_stream_reaches_the_client_while_it_is_still_being_generated(gateway, fake, account):
    """The provider sends three events, then waits until the client has read the first word:
    had the gateway buffered the stream, that word would never come before the rest."""
    fake.behave({"pause_after": 3, "words": 6})
    client = client_for(gateway, account.token())
    words, sent_then = [], None
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as response:
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
                if sent_then is None:
                    sent_then = fake.requests()[0]["events_sent"]
                    fake.release()
        request_id = response.headers["x-lava-request-id"]
    assert sent_then == 3 and "".join(words) == "w0 w1 w2 w3 w4 w5"
    assert gateway.row(request_id)["output_tokens"] == 6


def test_a_large_stream_passes_without_the_gateway_holding_it(gateway, fake, account):
    """64 MB of events through the gateway grow its peak memory by far less than 64 MB."""

    def peak_kb() -> int:
        status = open(f"/proc/{gateway.process.pid}/status").read()
        return int(status.split("VmHWM:")[1].split()[0])

    fake.behave({"words": 32_000, "word_bytes": 2000})
    before = peak_kb()
    received = 0
    client = client_for(gateway, account.token())
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as response:
        for line in response.iter_lines():
            received += len(line)
        request_id = response.headers["x-lava-request-id"]
    assert received > 64_000_000
    assert peak_kb() - before < 24_000
    assert gateway.row(request_id)["output_tokens"] == 32_000


def test_byok_sends_the_customers_key_and_charges_fees_only(gateway, fake, account):
    own_key = "sk-customer-own-key-0d9e"
    token = account.token(provider_key=own_key)
    balance_before = gateway.store.wallet_balance(account.wallet_id)
    raw = client_for(gateway, token).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)

    [seen] = fake.requests()
    assert upstream_auth(seen) == [f"Bearer {own_key}"]
    row = gateway.row(raw.headers["x-lava-request-id"])
    total, wallet, merchant = expected_costs("gpt-4o-mini", PROMPT_TOKENS, 5, mode="byok")
    assert (row["status"], row["key_mode"]) == ("completed", "unmanaged")
    assert (row["total_cost"], row["wallet_cost"], row["merchant_cost"]) == (
        as_text(total),
        as_text(wallet),
        as_text(merchant),
    )
    assert gateway.store.wallet_balance(account.wallet_id) == balance_before - wallet


def test_metering_only_records_the_cost_and_charges_nobody(gateway, fake, account):
    own_key = "sk-customer-metering-only-77aa"
    token = account.token(provider_key=own_key, billed=False)
    balance_before = gateway.store.wallet_balance(account.wallet_id)
    raw = client_for(gateway, token).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)

    [seen] = fake.requests()
    assert upstream_auth(seen) == [f"Bearer {own_key}"]
    row = gateway.row(raw.headers["x-lava-request-id"])
    total, _, _ = expected_costs("gpt-4o-mini", PROMPT_TOKENS, 5, fees=None)
    assert (row["status"], row["key_mode"], row["connection_id"], row["product_id"]) == (
        "completed",
        "unmanaged",
        None,
        None,
    )
    assert row["merchant_id"] == account.merchant_id
    assert (row["total_cost"], row["wallet_cost"], row["merchant_cost"]) == (
        as_text(total),
        "0.0000000000",
        "0.0000000000",
    )
    assert gateway.store.wallet_balance(account.wallet_id) == balance_before


def test_merchant_paid_provider_cost(gateway, fake):
    fees = ProductFees(fixed_fee=Decimal("0.002"), markup_percent=Decimal("5"), provider_cost_payer=Payer.MERCHANT)
    account = make_account(gateway.store, fees)
    raw = client_for(gateway, account.token()).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    row = gateway.row(raw.headers["x-lava-request-id"])
    usage = genai_prices.Usage(input_tokens=PROMPT_TOKENS, output_tokens=5)
    provider = dollars(genai_prices.calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price)
    fee = dollars(Decimal("0.002") + provider * Decimal("0.05"))
    assert (row["total_cost"], row["wallet_cost"], row["merchant_cost"]) == (
        as_text(provider + fee),
        as_text(fee),
        as_text(provider),
    )


def refused(gateway, fake, base_url: str, token: str, expected: type, status: int, code: str):
    """Send through the SDK, expect a refusal; nothing upstream, no ledger row, an audit entry."""
    rows_before, audit_before = len(gateway.rows()), len(gateway.audit())
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
    with pytest.raises(expected) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    error = raised.value
    assert error.status_code == status and error.code == code
    assert error.response.headers["x-lava-request-id"].startswith("req_")
    assert fake.requests() == []
    [entry] = gateway.audit_since(audit_before)
    assert len(gateway.rows()) == rows_before
    audit = gateway.audit()
    assert (entry["status"], entry["code"], entry["client_address"]) == (status, code, "127.0.0.1")
    assert entry["request_id"] == error.response.headers["x-lava-request-id"]
    assert token not in json.dumps(audit)
    return entry


@pytest.mark.parametrize(
    "token, code",
    [
        ("not a token", "invalid_token"),
        (base64.b64encode(b"[1, 2]").decode(), "invalid_token"),
        (base64.b64encode(b'{"secret_key": 5}').decode(), "invalid_token"),
        (base64.b64encode(b'{"secret_key": "msk_unknown", "provider_key": "sk-x"}').decode(), "invalid_secret_key"),
    ],
)
def test_a_bad_token_is_refused_with_401(gateway, fake, token, code):
    entry = refused(gateway, fake, gateway.forward_base(OPENAI_BASE), token, openai.AuthenticationError, 401, code)
    assert entry["target_host"] == "api.openai.com"


def test_a_refused_client_that_leaves_before_sending_its_body_is_still_audited(gateway, fake):
    audited, head = len(gateway.audit()), b"> POST /openai/v1/chat/completions\n"
    heads = gateway.recorded().count(head)
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer not-a-token\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":'
        )
        wait_until(lambda: gateway.recorded().count(head) > heads, "the gateway to read the head")  # refused there
    [entry] = gateway.audit_since(audited)
    assert (entry["status"], entry["code"], entry["target_host"]) == (401, "invalid_token", "openai")
    assert fake.requests() == []


def test_another_merchants_connection_is_refused(gateway, fake, account):
    other = make_account(gateway.store)
    mixed = secret(
        encode_token(
            secret_key=other.secret_key,
            connection_secret=account.connection_secret,
            product_secret=account.product_secret,
        )
    )
    refused(
        gateway, fake, gateway.forward_base(OPENAI_BASE), mixed, openai.AuthenticationError, 401, "invalid_connection"
    )


def test_a_revoked_connection_is_refused_once_the_remembered_principal_is_stale(gateway, fake):
    """Within PRINCIPAL_STALENESS (under the second SPEC §9 allows every gateway)."""
    account = make_account(gateway.store)
    client_for(gateway, account.token()).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    fake.reset()
    gateway.store.revoke_connection(account.connection_id)
    time.sleep(PRINCIPAL_STALENESS)  # the promise is about time: the next request after it
    refused(
        gateway,
        fake,
        gateway.forward_base(OPENAI_BASE),
        account.token(),
        openai.AuthenticationError,
        401,
        "invalid_connection",
    )


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/v1",
        "https://api.openai.com.evil.example/v1",
        "https://api.openai.com@evil.example/v1",
        "http://api.openai.com/v1",
        "https://127.0.0.1/v1",
    ],
)
def test_a_target_that_is_not_a_provider_is_refused_with_403(gateway, fake, account, target):
    base = f"{gateway.url}/v1/forward?u={target}/"
    entry = refused(gateway, fake, base, account.token(), openai.PermissionDeniedError, 403, "provider_not_allowed")
    assert entry["target_host"] in target


def test_body_without_model_is_a_400_in_the_openai_shape(gateway, fake, account):
    client = client_for(gateway, account.token())
    with pytest.raises(openai.BadRequestError) as raised:
        client.post("/chat/completions", body={"messages": MESSAGES}, cast_to=object)
    assert raised.value.code == "missing_model"
    assert fake.requests() == []


def test_managed_mode_for_a_provider_without_a_managed_key_is_a_403(gateway, fake, account):
    base = gateway.forward_base(f"{SELF_HOSTED}/v1/")
    entry = refused(gateway, fake, base, account.token(), openai.PermissionDeniedError, 403, "no_managed_key")
    assert entry["target_host"] == "llm.selfhosted.test"


def test_a_wallet_that_cannot_pay_is_refused_with_402(gateway, fake):
    account = make_account(gateway.store, balance=Decimal(0))
    refused(
        gateway,
        fake,
        gateway.forward_base(OPENAI_BASE),
        account.token(),
        openai.APIStatusError,
        402,
        "insufficient_balance",
    )


def test_an_upstream_error_reaches_the_client_unchanged_and_is_an_error_row(gateway, fake, account):
    fake.behave(
        {
            "status": 429,
            "headers": {"retry-after": "120"},
            "body": {"error": {"message": "slow down", "type": "rate_limit", "code": None}},
        }
    )
    balance_before = gateway.store.wallet_balance(account.wallet_id)
    with pytest.raises(openai.RateLimitError) as raised:
        client_for(gateway, account.token()).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    response = raised.value.response
    assert response.headers["retry-after"] == "120" and raised.value.body["message"] == "slow down"
    row = gateway.row(response.headers["x-lava-request-id"])
    assert (row["status"], row["upstream_status"], row["error_message"]) == (
        "error",
        429,
        "provider answered HTTP 429: slow down",
    )
    assert (row["total_cost"], row["wallet_cost"]) == ("0.0000000000", "0.0000000000")
    assert gateway.store.wallet_balance(account.wallet_id) == balance_before


def test_a_gzip_stream_is_metered_and_reaches_the_client_as_sent(gateway, fake, account):
    """The client asked for usage itself, so the gateway drops nothing and passes the gzip bytes on."""
    fake.behave({"gzip": True, "words": 9})
    client = client_for(gateway, account.token())
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as response:
        assert response.headers["content-encoding"] == "gzip"
        chunks = list(response.parse())
        request_id = response.headers["x-lava-request-id"]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == " ".join(
        f"w{i}" for i in range(9)
    )
    row = gateway.row(request_id)
    assert (row["status"], row["output_tokens"], row["input_tokens"]) == ("completed", 9, PROMPT_TOKENS)


def test_metadata_from_the_query_and_headers_is_recorded(gateway, fake, account):
    base = f"{gateway.url}/v1/forward?metadata=%7B%22user%22%3A%22u_42%22%7D&u={OPENAI_BASE}"
    client = openai.OpenAI(base_url=base, api_key=account.token(), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-lava-metadata-feature": "summaries"}
    )
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert json.loads(row["metadata"]) == {"user": "u_42", "feature": "summaries"}
    [seen] = fake.requests()
    assert not [name for name, _ in seen["headers"] if name.startswith("x-lava")]


def test_metadata_past_the_limits_is_a_400(gateway, fake, account):
    client = client_for(gateway, account.token())
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-lava-metadata-user": "x" * 256}
        )
    assert raised.value.code == "invalid_metadata"
    assert fake.requests() == []


def test_the_pending_row_is_on_disk_before_the_provider_is_called(gateway, fake, account):
    """So that a crash from the moment the call goes out loses nothing (SPEC §3.2)."""
    fake.behave({"first_byte_delay": 1.0})
    done = threading.Event()
    client = client_for(gateway, account.token())
    worker = threading.Thread(
        target=lambda: (client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES), done.set())
    )
    worker.start()
    deadline = time.monotonic() + 5
    while not fake.requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    pending = [row for row in gateway.rows() if row["status"] == "pending"]
    assert fake.requests() and not done.is_set()
    assert [(row["connection_id"], row["endpoint"]) for row in pending] == [
        (account.connection_id, "POST https://api.openai.com/v1/chat/completions")
    ]
    worker.join()
    assert gateway.row(pending[0]["request_id"])["status"] == "completed"
