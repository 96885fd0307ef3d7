"""The response cache: the same question twice reaches the
provider once; the second answer is the first, byte for byte, and its row is a hit that costs
no provider money, only the product's fees."""

import json
from decimal import Decimal

import openai
import pytest

from meterproxy.store import utc_now
from pricing.fees import ProductFees
from tests.harness import make_account, wait_until

ON_BOTH_BACKENDS = True  # the gateway and the ledgers of this module's tests (tests/conftest.py)

FEES = ProductFees(fixed_fee=Decimal("0.001"))
DAY = 24 * 3600


def ask(gateway, account, content: str, base: str | None = None, **options):
    client = openai.OpenAI(base_url=base or f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], **options
    )


@pytest.fixture(scope="module")
def account(gateway):
    return make_account(gateway.store, FEES, cache_ttl=DAY)


def test_the_same_question_twice_reaches_the_provider_once(gateway, fake, account):
    first = ask(gateway, account, "what is a ledger")
    second = ask(gateway, account, "what is a ledger")
    assert len(fake.requests()) == 1
    assert second.content == first.content and second.headers["content-type"] == first.headers["content-type"]
    assert (first.headers["x-meterproxy-cache"], second.headers["x-meterproxy-cache"]) == ("miss", "hit")
    missed, hit = gateway.row(first.headers["x-lava-request-id"]), gateway.row(second.headers["x-lava-request-id"])
    assert (missed["cache_hit"], hit["cache_hit"], hit["status"], hit["attempts"]) == (0, 1, "completed", 0)
    assert Decimal(missed["total_cost"]) > Decimal("0.001")
    assert (hit["total_cost"], hit["wallet_cost"]) == ("0.0010000000", "0.0010000000")  # the fee only
    assert hit["input_tokens"] == missed["input_tokens"] and hit["output_tokens"] == missed["output_tokens"]


def test_key_order_and_whitespace_do_not_matter_but_the_merchant_does(gateway, fake, account):
    ask(gateway, account, "order", temperature=0, top_p=1)
    assert ask(gateway, account, "order", top_p=1, temperature=0).headers["x-meterproxy-cache"] == "hit"
    other = make_account(gateway.store, FEES, cache_ttl=DAY)
    assert ask(gateway, other, "order", temperature=0, top_p=1).headers["x-meterproxy-cache"] == "miss"
    assert len(fake.requests()) == 2


@pytest.mark.parametrize(
    "how",
    [
        {"base": "fresh"},
        {"extra_headers": {"cache-control": "no-cache"}},
        {"extra_headers": {"cache-control": "no-store"}},
    ],
    ids=["fresh=1", "no-cache", "no-store"],
)
def test_fresh_no_cache_and_no_store_reach_the_provider(gateway, fake, account, how):
    question = f"always ask {how}"
    ask(gateway, account, question)
    base = f"{gateway.url}/v1/forward?fresh=1&u=https://api.openai.com/v1/" if how.get("base") else None
    again = ask(gateway, account, question, base=base, extra_headers=how.get("extra_headers"))
    assert len(fake.requests()) == 2
    assert again.headers["x-meterproxy-cache"] == ("bypass" if "no-store" in str(how) else "miss")


def test_an_expired_entry_reaches_the_provider(gateway, fake):
    account = make_account(gateway.store, FEES, cache_ttl=DAY)  # its product's only entry is this one
    ask(gateway, account, "short lived", extra_headers={"x-meterproxy-cache-ttl": "1"})

    def kept() -> list[str]:
        entries = gateway.store.db["cache_entries"].rows_where("product_id = ?", [account.product_id])
        return [entry["expires_at"] for entry in entries]

    [expires_at] = wait_until(kept, "the answer to be kept")
    wait_until(lambda: utc_now() > expires_at, "the entry to expire")  # a second after it was kept
    assert ask(gateway, account, "short lived").headers["x-meterproxy-cache"] == "miss"
    assert len(fake.requests()) == 2


@pytest.mark.parametrize(
    "behaviour", [{"status": 400}, {"status": 500}, {"usage": False}], ids=["4xx", "5xx", "unmetered"]
)
def test_errors_and_unmetered_answers_are_never_kept(gateway, fake, account, behaviour):
    question = f"do not keep {behaviour}"
    fake.behave(*[behaviour] * 3)  # a 500 is retried: every attempt fails the same way
    try:
        ask(gateway, account, question)
    except openai.APIStatusError:
        pass
    fake.reset()
    assert ask(gateway, account, question).headers["x-meterproxy-cache"] == "miss"
    assert len(fake.requests()) == 1


def test_a_product_without_cache_is_not_in_play_unless_a_request_asks(gateway, fake):
    plain = make_account(gateway.store, FEES)
    first = ask(gateway, plain, "no cache here")
    assert "x-meterproxy-cache" not in first.headers
    ask(gateway, plain, "opted in", extra_headers={"x-meterproxy-cache": "on"})
    assert (
        ask(gateway, plain, "opted in", extra_headers={"x-meterproxy-cache": "on"}).headers["x-meterproxy-cache"]
        == "hit"
    )
    assert len(fake.requests()) == 2


def stream_text(gateway, account, content: str, **options) -> tuple[list[str], dict]:
    """The chunks' texts as the client got them, and the response headers."""
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], stream=True, **options
    ) as response:
        return [chunk.model_dump_json() for chunk in response.parse()], dict(response.headers)


@pytest.mark.parametrize("options", [{}, {"stream_options": {"include_usage": True}}], ids=["no-usage", "usage"])
def test_a_stream_is_kept_as_the_client_received_it_and_replayed(gateway, fake, account, options):
    question = f"stream me {options}"
    first, first_headers = stream_text(gateway, account, question, **options)
    second, second_headers = stream_text(gateway, account, question, **options)
    assert second == first and len(first) >= 5
    assert ("usage" in first[-1] and '"choices":[]' in first[-1]) is bool(options)  # the client's own view
    assert (first_headers["x-meterproxy-cache"], second_headers["x-meterproxy-cache"]) == ("miss", "hit")
    assert len(fake.requests()) == 1
    missed = gateway.row(first_headers["x-lava-request-id"])
    hit = gateway.row(second_headers["x-lava-request-id"])
    assert (hit["cache_hit"], hit["stream"], hit["usage_source"], hit["total_cost"]) == (
        1,
        1,
        "provider",
        "0.0010000000",
    )
    assert (hit["input_tokens"], hit["output_tokens"]) == (missed["input_tokens"], missed["output_tokens"])


def test_a_cut_stream_is_never_kept(gateway, fake, account):
    fake.behave({"cut_after": 3})
    with pytest.raises(openai.APIConnectionError):
        stream_text(gateway, account, "cut me")
    fake.reset()
    assert stream_text(gateway, account, "cut me")[1]["x-meterproxy-cache"] == "miss"


def test_the_admin_command_shows_hits_and_savings_and_purges(gateway, fake, tmp_path):
    from tests.test_commands import meterproxy

    account = make_account(gateway.store, FEES, cache_ttl=DAY)
    for _ in range(3):
        ask(gateway, account, "count my savings")
    rows = [row for row in gateway.rows() if row["product_id"] == account.product_id]
    for row in rows:
        gateway.row(row["request_id"])
    missed = next(row for row in gateway.rows() if row["product_id"] == account.product_id and not row["cache_hit"])
    saved_each = Decimal(missed["total_cost"]) - Decimal("0.001")
    [stats] = [
        entry
        for entry in json.loads(meterproxy(gateway.db, "--json", "cache", "stats"))
        if entry["product_id"] == account.product_id
    ]
    assert (stats["entries"], stats["hits"], stats["hit_ratio"]) == (1, 2, "0.667")
    assert Decimal(stats["saved"]) == 2 * saved_each
    purged = json.loads(meterproxy(gateway.db, "--json", "cache", "purge", account.product_id))
    assert purged["purged"] == 1
    assert ask(gateway, account, "count my savings").headers["x-meterproxy-cache"] == "miss"


def test_the_store_drops_expired_entries_and_the_oldest_past_the_size_cap(tmp_path):
    from meterproxy.store import Store

    store = Store(tmp_path / "cache.sqlite")

    def entry(key: str, created: str, expires: str, size: int) -> dict:
        return {
            "key": key, "merchant_id": "mer_1", "product_id": "prd_1", "provider": "openai", "endpoint": "POST /x",
            "content_type": "application/json", "body": b"x" * size, "usage": "{}", "provider_cost": "0.1",
            "created_at": created, "expires_at": expires,
        }  # fmt: skip

    with store.transaction():
        store.keep(entry("old", "2026-01-01T00:00:00.000Z", "2026-01-01T00:00:05.000Z", 10), 1000)
        store.keep(entry("a", "2026-01-01T00:00:10.000Z", "2027-01-01T00:00:00.000Z", 400), 1000)
        store.keep(entry("b", "2026-01-01T00:00:20.000Z", "2027-01-01T00:00:00.000Z", 400), 1000)
        store.keep(entry("c", "2026-01-01T00:00:30.000Z", "2027-01-01T00:00:00.000Z", 400), 1000)
    assert [row["key"] for row in store.db["cache_entries"].rows] == ["b", "c"]  # "old" expired, "a" evicted
    assert store.cached("b", "2026-06-01T00:00:00.000Z")["content_type"] == "application/json"
    assert store.cached("b", "2027-06-01T00:00:00.000Z") is None  # expired by then
    store.close()
