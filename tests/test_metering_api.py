"""End to end: the metering API (SPEC §1.4) over real HTTP against `mitmdump -s addons/gateway.py`.

Costs are computed here independently from genai-prices and the product's fees; each test that
writes uses its own merchant, since the gateway (and its database) is shared by the module.
"""

import base64
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace

import httpx2
import pytest

from meterproxy.ids import new_id
from meterproxy.queries import COSTS, FIGURES
from meterproxy.store import Store, utc_now
from tests.harness import Account, make_account
from tests.test_forward_openai import FEES, MESSAGES, PROMPT_TOKENS, as_text, client_for, expected_costs

ON_BOTH_BACKENDS = True  # the gateway and the ledgers of this module's tests (tests/conftest.py)

ZERO_TEXT = "0.0000000000"
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
METADATA = {"customer": "acme", "feature": "summaries"}


# --- helpers ---------------------------------------------------------------------------------


def api(gateway, secret_key: str | None) -> httpx2.Client:
    headers = {"Authorization": f"Bearer {secret_key}"} if secret_key else {}
    return httpx2.Client(base_url=gateway.url, headers=headers)


def usage_body(account: Account, **changes) -> dict:
    """A billed create request: the account's connection and product, gpt-4o-mini at OpenAI."""
    body = {
        "connection_secret": account.connection_secret,
        "product_secret": account.product_secret,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "input_tokens": 1200,
        "output_tokens": 340,
        "metadata": METADATA,
    }
    return {**body, **changes}


def create(client: httpx2.Client, account: Account, **changes) -> dict:
    response = client.post("/v1/requests", json=usage_body(account, **changes))
    assert response.status_code == 201, response.text
    return response.json()


def listed(client: httpx2.Client, path: str = "/v1/requests", **params) -> list[dict]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def assert_error(response, status: int, error_type: str, code: str) -> None:
    """SPEC §7: the OpenAI error shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (error_type, code)
    assert isinstance(error["message"], str) and error["message"]


def balance(gateway, account: Account) -> Decimal:
    return gateway.store.wallet_balance(account.wallet_id)


def ledger_rows(gateway, account: Account) -> list[dict]:
    return list(gateway.store.db["requests"].rows_where("merchant_id = ?", [account.merchant_id]))


def seed(store: Store, account: Account, created_at: str, input_tokens: int, output_tokens: int, **fields) -> dict:
    """A completed row written through the Store as the metering API writes it, at a chosen
    time (the API itself always stamps "now"), priced for the FEES product."""
    total, wallet, merchant = expected_costs(fields.get("model", "gpt-4o-mini"), input_tokens, output_tokens)
    row = {
        "request_id": new_id("req"),
        "status": "completed",
        "provider": "openai",
        "endpoint": "POST /v1/requests",
        "key_mode": "managed",
        "model": "gpt-4o-mini",
        "merchant_id": account.merchant_id,
        "connection_id": account.connection_id,
        "product_id": account.product_id,
        "wallet_id": account.wallet_id,
        "metadata": {},
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        **dict.fromkeys(("cached_input_tokens", "cache_write_tokens", "reasoning_tokens"), 0),
        **dict.fromkeys(("input_characters", "output_characters"), 0),
        **dict.fromkeys(("input_seconds", "output_seconds"), "0"),
        "usage_source": "provider",
        "stream": False,
        "cache_hit": False,
        "attempts": 0,
        "error_message": None,
        "total_cost": as_text(total),
        "wallet_cost": as_text(wallet),
        "merchant_cost": as_text(merchant),
        "created_at": created_at,
        "completed_at": created_at,
        **fields,
    }
    with store.transaction():
        store.record_usage(row, row["wallet_id"], wallet)
    return row


def daily(records: list[dict]) -> list[dict]:
    """The `/v1/usage` rollup expected for these records: one entry per UTC day, oldest first,
    costs added exactly."""
    days: dict[str, list[dict]] = {}
    for record in records:
        days.setdefault((record.get("timestamp") or record["created_at"])[:10], []).append(record)
    return [{"date": day, **totals(group)} for day, group in sorted(days.items())]


def totals(records: list[dict]) -> dict:
    """Request count, figure sums and exact cost sums of ledger rows or API records."""
    return {
        "requests": len(records),
        **{name: sum(record[name] for record in records) for name in FIGURES},
        **{name: as_text(sum(Decimal(record[name]) for record in records)) for name in COSTS},
    }


@pytest.fixture
def account(gateway) -> Account:
    return make_account(gateway.store, FEES)


@pytest.fixture
def client(gateway, account):
    with api(gateway, account.secret_key) as client:
        yield client


# --- create ----------------------------------------------------------------------------------


def test_create_prices_charges_and_records_usage(gateway, account, client):
    before = balance(gateway, account)
    started = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    order = new_id("order")  # request ids are global: unique per test
    response = client.post("/v1/requests", json=usage_body(account, request_id=order, input_seconds="1.5"))
    record = response.json()

    assert response.status_code == 201, response.text
    total, wallet, merchant = expected_costs("gpt-4o-mini", 1200, 340)
    assert wallet > 0
    assert record == {
        "request_id": order,
        "status": "completed",
        "provider": "openai",
        "endpoint": "POST /v1/requests",
        "key_mode": "managed",
        "model": "gpt-4o-mini",
        "provider_response_id": None,
        "connection_id": account.connection_id,
        "product_id": account.product_id,
        "metadata": METADATA,
        "input_tokens": 1200,
        "output_tokens": 340,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "input_characters": 0,
        "output_characters": 0,
        "input_seconds": "1.5",
        "output_seconds": "0",
        "usage_source": "provider",
        "stream": False,
        "cache_hit": False,
        "upstream_status": None,
        "error_message": None,
        "total_cost": as_text(total),
        "wallet_cost": as_text(wallet),
        "merchant_cost": as_text(merchant),
        "timestamp": record["timestamp"],
        "completed_at": record["timestamp"],
        "merchant_id": account.merchant_id,  # what the dashboard's operator view needs
        "attempts": 0,
        "latency_ms": None,
        "ttfb_ms": None,
    }
    assert ISO_MS.fullmatch(record["timestamp"]) and record["timestamp"] >= started
    assert balance(gateway, account) == before - wallet

    [row] = ledger_rows(gateway, account)
    assert row == {
        **row,
        "request_id": order,
        "status": "completed",
        "merchant_id": account.merchant_id,
        "wallet_id": account.wallet_id,
        "connection_id": account.connection_id,
        "product_id": account.product_id,
        "input_tokens": 1200,
        "output_tokens": 340,
        "total_cost": as_text(total),
        "wallet_cost": as_text(wallet),
        "merchant_cost": as_text(merchant),
        "created_at": record["timestamp"],
        "completed_at": record["timestamp"],
    }
    assert json.loads(row["metadata"]) == METADATA


def test_characters_and_seconds_are_charged_at_the_products_rates(gateway):
    """Usage recorded in characters and seconds pays the product's per-million-characters and
    per-second rates on top of the tokens' price and the fixed fee and markup."""
    fees = FEES.model_copy(update={"character_rate": Decimal("15"), "second_rate": Decimal("0.006")})
    account = make_account(gateway.store, fees)
    figures = {"input_characters": 2000, "output_characters": 500, "input_seconds": "1.5", "output_seconds": "2.25"}
    before = balance(gateway, account)
    with api(gateway, account.secret_key) as client:
        record = create(client, account, **figures)
    total, wallet, _ = expected_costs("gpt-4o-mini", 1200, 340)
    per_unit = 2500 * Decimal("15") / 1_000_000 + Decimal("3.75") * Decimal("0.006")  # 0.0375 + 0.0225
    assert (record["total_cost"], record["wallet_cost"]) == (as_text(total + per_unit), as_text(wallet + per_unit))
    assert balance(gateway, account) == before - wallet - per_unit


def test_create_without_a_request_id_gets_a_prefixed_ulid(client, account):
    record = create(client, account)
    assert re.fullmatch(r"req_[0-9A-HJKMNP-TV-Z]{26}", record["request_id"])


def test_repeating_a_create_returns_the_same_record_and_charges_once(gateway, account, client):
    order = new_id("order")
    first = create(client, account, request_id=order)
    after_first = balance(gateway, account)

    repeat = client.post("/v1/requests", json=usage_body(account, request_id=order))

    assert repeat.status_code == 200, repeat.text
    assert repeat.json() == first
    assert balance(gateway, account) == after_first == Decimal(10) - Decimal(first["wallet_cost"])
    assert len(ledger_rows(gateway, account)) == 1


@pytest.mark.parametrize(
    "conflict",
    [{"input_tokens": 1201}, {"metadata": {"customer": "someone_else"}}, {"model": "gpt-4o"}],
    ids=["input_tokens", "metadata", "model"],
)
def test_reusing_a_request_id_for_other_figures_is_a_conflict_that_changes_nothing(gateway, account, client, conflict):
    order = new_id("order")
    first = create(client, account, request_id=order)
    after_first = balance(gateway, account)

    response = client.post("/v1/requests", json=usage_body(account, request_id=order, **conflict))

    assert_error(response, 409, "conflict_error", "request_id_conflict")
    assert client.get(f"/v1/requests/{order}").json() == first
    assert balance(gateway, account) == after_first
    assert len(ledger_rows(gateway, account)) == 1


def test_metering_only_create_charges_nobody(gateway, account, client):
    record = create(client, account, connection_secret=None, product_secret=None)

    provider_cost, _, _ = expected_costs("gpt-4o-mini", 1200, 340, fees=None)
    assert record == {
        **record,
        "status": "completed",
        "key_mode": "unmanaged",
        "connection_id": None,
        "product_id": None,
        "total_cost": as_text(provider_cost),
        "wallet_cost": ZERO_TEXT,
        "merchant_cost": ZERO_TEXT,
    }
    assert provider_cost > 0
    assert balance(gateway, account) == Decimal(10)


def test_a_model_without_a_price_is_an_error_record_never_a_silent_zero(gateway, account, client):
    record = create(client, account, model="gpt-nonexistent-9")

    assert record == {
        **record,
        "status": "error",
        "model": "gpt-nonexistent-9",
        "input_tokens": 1200,
        "total_cost": ZERO_TEXT,
        "wallet_cost": ZERO_TEXT,
        "merchant_cost": ZERO_TEXT,
    }
    assert "'gpt-nonexistent-9'" in record["error_message"]
    assert balance(gateway, account) == Decimal(10)


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"provider": "openia"}, "unknown_provider"),
        ({"input_tokens": -1}, "invalid_request"),
        ({"output_seconds": "-0.5"}, "invalid_request"),
        ({"model": None}, "invalid_request"),
        ({"model": ""}, "invalid_request"),
        ({"metadata": {"customer-id": "acme"}}, "invalid_metadata"),
        ({"metadata": {"customer": "x" * 256}}, "invalid_metadata"),
        ({"metadata": {"customer": ""}}, "invalid_metadata"),
        ({"metadata": {"customer": 7}}, "invalid_request"),
        ({"provider_key": "sk-not-here"}, "invalid_request"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else value,
)
def test_invalid_create_is_refused_with_400_and_writes_nothing(gateway, account, client, changes, code):
    response = client.post("/v1/requests", json=usage_body(account, **changes))

    assert_error(response, 400, "invalid_request_error", code)
    assert ledger_rows(gateway, account) == []
    assert balance(gateway, account) == Decimal(10)


def test_create_without_a_model_is_refused(gateway, account, client):
    body = usage_body(account)
    del body["model"]
    assert_error(client.post("/v1/requests", json=body), 400, "invalid_request_error", "invalid_request")
    assert ledger_rows(gateway, account) == []


def test_create_with_a_body_that_is_not_json_is_refused(client):
    response = client.post("/v1/requests", content=b"input_tokens=3", headers={"content-type": "text/plain"})
    assert_error(response, 400, "invalid_request_error", "invalid_request")


def test_a_wallet_holding_exactly_the_cost_pays_it(gateway):
    _, wallet_cost, _ = expected_costs("gpt-4o-mini", 1200, 340)
    account = make_account(gateway.store, FEES, balance=wallet_cost)

    with api(gateway, account.secret_key) as client:
        create(client, account)
    assert balance(gateway, account) == 0


def test_a_wallet_that_cannot_cover_the_cost_is_refused_with_402_and_no_row(gateway):
    _, wallet_cost, _ = expected_costs("gpt-4o-mini", 1200, 340)
    short = wallet_cost - Decimal("0.0000000001")
    account = make_account(gateway.store, FEES, balance=short)

    with api(gateway, account.secret_key) as client:
        response = client.post("/v1/requests", json=usage_body(account))

    assert_error(response, 402, "insufficient_funds", "insufficient_balance")
    assert ledger_rows(gateway, account) == []
    assert balance(gateway, account) == short


def test_money_held_for_requests_in_flight_is_not_available(gateway):
    _, wallet_cost, _ = expected_costs("gpt-4o-mini", 1200, 340)
    account = make_account(gateway.store, FEES, balance=wallet_cost)
    with gateway.store.transaction():  # a call in flight (of no merchant's ledger here)
        in_flight = {"request_id": new_id("req"), "wallet_id": account.wallet_id, "created_at": utc_now()}
        gateway.store.open_request(in_flight, Decimal("0.0000000001"))

    with api(gateway, account.secret_key) as client:
        assert_error(
            client.post("/v1/requests", json=usage_body(account)), 402, "insufficient_funds", "insufficient_balance"
        )
    assert ledger_rows(gateway, account) == []


@pytest.mark.parametrize(
    "changes",
    [{"input_tokens": 2**63, "connection_secret": None, "product_secret": None}, {"input_tokens": 10**30}],
    ids=["2**63 tokens metering-only", "10**30 tokens billed"],
)
def test_absurd_figures_are_refused_as_a_bad_request(gateway, account, client, changes):
    response = client.post("/v1/requests", json=usage_body(account, **changes))
    assert_error(response, 400, "invalid_request_error", "invalid_request")


# --- get -------------------------------------------------------------------------------------


def test_get_returns_the_record_and_404_for_an_unknown_id(client, account):
    record = create(client, account)

    response = client.get(f"/v1/requests/{record['request_id']}")
    assert response.status_code == 200, response.text
    assert response.json() == record
    assert_error(client.get("/v1/requests/req_01K7NOTANIDATALL000000000"), 404, "not_found_error", "request_not_found")


def test_a_forwarded_request_is_readable_through_the_api(gateway, account, client):
    raw = client_for(gateway, account.token()).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=7
    )
    request_id = raw.headers["x-lava-request-id"]
    row = gateway.row(request_id)

    record = client.get(f"/v1/requests/{request_id}").json()
    total, wallet, merchant = expected_costs("gpt-4o-mini", PROMPT_TOKENS, 7)
    assert record == {
        **record,
        "request_id": request_id,
        "status": "completed",
        "provider": "openai",
        "endpoint": "POST https://api.openai.com/v1/chat/completions",
        "key_mode": "managed",
        "provider_response_id": raw.parse().id,
        "connection_id": account.connection_id,
        "product_id": account.product_id,
        "metadata": {},
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": 7,
        "usage_source": "provider",
        "stream": False,
        "upstream_status": 200,
        "total_cost": as_text(total),
        "wallet_cost": as_text(wallet),
        "merchant_cost": as_text(merchant),
        "timestamp": row["created_at"],
        "completed_at": row["completed_at"],
    }
    assert [item["request_id"] for item in listed(client, connection_id=account.connection_id)] == [request_id]


# --- list and usage filters ------------------------------------------------------------------

CATALOG = {  # name: (connection, product, model, input_tokens, output_tokens, metadata), oldest first
    "alice_mini": ("first", "first", "gpt-4o-mini", 1000, 200, {"customer": "alice"}),
    "bob_4o": ("second", "first", "gpt-4o", 800, 120, {"customer": "bob"}),
    "bob_pro_mini": ("first", "second", "gpt-4o-mini", 2500, 640, {"customer": "bob", "plan": "pro"}),
    "alice_unpriced": ("first", "first", "gpt-unpriced-1", 300, 30, {"customer": "alice"}),
}


@pytest.fixture(scope="module")
def catalog(gateway):
    """One merchant with two connections and two products, and the CATALOG records created
    through the API (read-only for the tests that use it)."""
    account = make_account(gateway.store, FEES)
    connection, connection_secret = gateway.store.create_connection(account.merchant_id, account.wallet_id)
    product, product_secret = gateway.store.create_product(account.merchant_id, "second product", FEES)
    secrets = {
        "connection": {"first": account.connection_secret, "second": connection_secret},
        "product": {"first": account.product_secret, "second": product_secret},
    }
    ids = {
        "connection_id": {"first": account.connection_id, "second": connection["id"]},
        "product_id": {"first": account.product_id, "second": product["id"]},
    }
    records = {}
    with api(gateway, account.secret_key) as client:
        for name, (con, prd, model, input_tokens, output_tokens, metadata) in CATALOG.items():
            records[name] = create(
                client,
                account,
                connection_secret=secrets["connection"][con],
                product_secret=secrets["product"][prd],
                model=model,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                metadata=metadata,
            )
    assert [records[name]["status"] for name in CATALOG] == ["completed"] * 3 + ["error"]
    return SimpleNamespace(account=account, ids=ids, records=records)


FILTERS = [  # query parameters (connection and product by role), matching records newest first
    ({}, ["alice_unpriced", "bob_pro_mini", "bob_4o", "alice_mini"]),
    ({"connection_id": "second"}, ["bob_4o"]),
    ({"connection_id": "first"}, ["alice_unpriced", "bob_pro_mini", "alice_mini"]),
    ({"product_id": "second"}, ["bob_pro_mini"]),
    ({"model": "gpt-4o"}, ["bob_4o"]),
    ({"status": "error"}, ["alice_unpriced"]),
    ({"status": "completed"}, ["bob_pro_mini", "bob_4o", "alice_mini"]),
    ({"status": "pending"}, []),
    ({"metadata.customer": "bob"}, ["bob_pro_mini", "bob_4o"]),
    ({"metadata.customer": "bob", "metadata.plan": "pro"}, ["bob_pro_mini"]),
    ({"metadata.customer": "carol"}, []),
    ({"model": "gpt-4o", "connection_id": "first"}, []),
]


def resolve(catalog, params: dict) -> dict:
    return {name: catalog.ids[name][value] if name in catalog.ids else value for name, value in params.items()}


@pytest.mark.parametrize("params, expected", FILTERS, ids=[json.dumps(params) for params, _ in FILTERS])
def test_list_filters(gateway, catalog, params, expected):
    with api(gateway, catalog.account.secret_key) as client:
        data = listed(client, **resolve(catalog, params))
    assert data == [catalog.records[name] for name in expected]


@pytest.mark.parametrize("params, expected", FILTERS, ids=[json.dumps(params) for params, _ in FILTERS])
def test_usage_rolls_up_the_same_filters_by_day(gateway, catalog, params, expected):
    with api(gateway, catalog.account.secret_key) as client:
        data = listed(client, "/v1/usage", **resolve(catalog, params))
    assert data == daily([catalog.records[name] for name in expected])


@pytest.mark.parametrize(
    "params",
    [{"status": "done"}, {"created_after": "yesterday"}, {"metadata.customer-id": "x"}, {"colour": "red"}],
    ids=["status", "created_after", "metadata key", "unknown parameter"],
)
@pytest.mark.parametrize("path", ["/v1/requests", "/v1/usage"])
def test_invalid_filters_are_refused(client, path, params):
    response = client.get(path, params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- time range ------------------------------------------------------------------------------

MOMENTS = {  # name: created_at, oldest first
    "last_ms_of_march_1": "2025-03-01T23:59:59.999Z",
    "midnight_march_2": "2025-03-02T00:00:00.000Z",
    "noon_march_2": "2025-03-02T12:00:00.000Z",
    "march_3": "2025-03-03T08:00:00.000Z",
}


@pytest.fixture
def timeline(gateway, account):
    rows = {}
    for index, (name, created_at) in enumerate(MOMENTS.items()):
        rows[name] = seed(gateway.store, account, created_at, 1000 + 111 * index, 70 + 13 * index)
    return rows


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"created_after": "2025-03-02T00:00:00Z"}, ["march_3", "noon_march_2", "midnight_march_2"]),
        ({"created_before": "2025-03-02T00:00:00Z"}, ["last_ms_of_march_1"]),
        (
            {"created_after": "2025-03-02T00:00:00Z", "created_before": "2025-03-03T00:00:00Z"},
            ["noon_march_2", "midnight_march_2"],
        ),
        ({"created_after": "2025-03-02T01:00:00+01:00"}, ["march_3", "noon_march_2", "midnight_march_2"]),
        ({"created_before": "2025-03-02T12:00:00.001Z"}, ["noon_march_2", "midnight_march_2", "last_ms_of_march_1"]),
    ],
    ids=["after (inclusive)", "before (exclusive)", "one day", "after with offset", "before, ms"],
)
def test_list_by_time_range(client, timeline, params, expected):
    assert [record["request_id"] for record in listed(client, **params)] == [
        timeline[name]["request_id"] for name in expected
    ]


def test_usage_adds_the_costs_of_a_day_exactly(client, timeline):
    data = listed(client, "/v1/usage")
    march_2 = [timeline["midnight_march_2"], timeline["noon_march_2"]]

    assert [day["date"] for day in data] == ["2025-03-01", "2025-03-02", "2025-03-03"]
    assert data == daily(list(timeline.values()))
    assert data[1]["requests"] == 2
    assert data[1]["input_tokens"] == 1111 + 1222
    assert Decimal(data[1]["total_cost"]) == sum(Decimal(row["total_cost"]) for row in march_2)
    assert Decimal(data[1]["wallet_cost"]) == sum(Decimal(row["wallet_cost"]) for row in march_2)
    assert listed(client, "/v1/usage", created_after="2025-03-02T00:00:00Z", created_before="2025-03-03T00:00:00Z") == [
        data[1]
    ]


def test_usage_adds_costs_in_the_millions_to_the_last_decimal(gateway):
    """Summed as floats, costs of this size would be off in their 9th and 10th decimals."""
    account = make_account(gateway.store, FEES, balance=Decimal("1e9"))
    rows = [
        seed(gateway.store, account, "2025-04-01T08:00:00.000Z", 123_456_789_012_345, 987_654_321),
        seed(gateway.store, account, "2025-04-01T09:00:00.000Z", 98_765_432_109_877, 123_456_789),
    ]
    with api(gateway, account.secret_key) as client:
        [day] = listed(client, "/v1/usage")

    assert Decimal(rows[0]["total_cost"]) > 10_000_000
    assert day == {"date": "2025-04-01", **totals(rows)}
    assert Decimal(day["total_cost"]) == Decimal(rows[0]["total_cost"]) + Decimal(rows[1]["total_cost"])


# --- pagination ------------------------------------------------------------------------------


def pages(client: httpx2.Client, limit: int) -> list[dict]:
    """Every page of the merchant's list, following next_cursor."""
    result, cursor = [], None
    while True:
        response = client.get("/v1/requests", params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        result.append(page)
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return result
        assert page["next_cursor"]
        cursor = page["next_cursor"]


def test_pagination_walks_every_record_once_newest_first(client, account):
    created = [create(client, account, input_tokens=100 + index)["request_id"] for index in range(7)]

    walked = pages(client, limit=3)

    assert [len(page["data"]) for page in walked] == [3, 3, 1]
    assert [page["has_more"] for page in walked] == [True, True, False]
    ids = [record["request_id"] for page in walked for record in page["data"]]
    assert ids == created[::-1]
    assert ids == [record["request_id"] for record in listed(client, limit=100)]
    assert [record["request_id"] for page in pages(client, limit=7) for record in page["data"]] == ids


def test_a_cursor_stays_valid_while_records_are_added(client, account):
    created = [create(client, account, input_tokens=100 + index)["request_id"] for index in range(4)]
    first = client.get("/v1/requests", params={"limit": 2}).json()

    newest = create(client, account, input_tokens=999)["request_id"]
    rest = client.get("/v1/requests", params={"limit": 2, "cursor": first["next_cursor"]}).json()

    assert [record["request_id"] for record in first["data"] + rest["data"]] == created[::-1]
    assert rest["has_more"] is False
    assert listed(client, limit=1)[0]["request_id"] == newest


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "not a cursor!"},
        {"cursor": base64.urlsafe_b64encode(b"[1, 2]").decode()},
        {"cursor": base64.urlsafe_b64encode(b"not json").decode()},
        {"limit": 0},
        {"limit": 101},
        {"limit": "ten"},
    ],
    ids=["cursor garbage", "cursor of numbers", "cursor not json", "limit 0", "limit 101", "limit ten"],
)
def test_invalid_cursor_or_limit_is_refused(client, params):
    response = client.get("/v1/requests", params=params)
    code = "invalid_cursor" if "cursor" in params else "invalid_request"
    assert_error(response, 400, "invalid_request_error", code)


# --- isolation and authentication ------------------------------------------------------------


@pytest.fixture
def other(gateway):
    """A second merchant, with its own connection, product and wallet."""
    account = make_account(gateway.store, FEES)
    with api(gateway, account.secret_key) as client:
        yield SimpleNamespace(account=account, client=client)


def test_a_merchant_never_sees_another_merchants_records(client, account, other):
    record = create(client, account)

    assert_error(other.client.get(f"/v1/requests/{record['request_id']}"), 404, "not_found_error", "request_not_found")
    assert listed(other.client) == []
    assert listed(other.client, connection_id=account.connection_id) == []
    assert listed(other.client, "/v1/usage") == []
    assert listed(other.client, "/v1/usage", product_id=account.product_id) == []


@pytest.mark.parametrize(
    "foreign", [("connection",), ("product",), ("connection", "product")], ids=["connection", "product", "both"]
)
def test_a_merchant_cannot_bill_another_merchants_connection_or_product(gateway, account, other, foreign):
    body = usage_body(
        other.account,
        **{f"{name}_secret": getattr(account, f"{name}_secret") for name in foreign},
    )
    response = other.client.post("/v1/requests", json=body)

    assert_error(response, 401, "authentication_error", f"invalid_{foreign[0]}")
    assert ledger_rows(gateway, account) == ledger_rows(gateway, other.account) == []
    assert balance(gateway, account) == balance(gateway, other.account) == Decimal(10)


def test_another_merchants_request_id_is_a_conflict_not_their_record(gateway, client, account, other):
    order = new_id("order")
    record = create(client, account, request_id=order)

    response = other.client.post("/v1/requests", json=usage_body(other.account, request_id=order))

    assert_error(response, 409, "conflict_error", "request_id_conflict")
    assert record["connection_id"] not in response.text and "acme" not in response.text
    assert client.get(f"/v1/requests/{order}").json() == record
    assert ledger_rows(gateway, other.account) == []
    assert balance(gateway, other.account) == Decimal(10)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer msk_not_a_real_key", "Basic {secret_key}", "Bearer {connection_secret}", "Bearer {forward_token}"],
    ids=["missing", "unknown key", "not bearer", "connection secret", "forward token"],
)
@pytest.mark.parametrize(
    "method, path",
    [("POST", "/v1/requests"), ("GET", "/v1/requests"), ("GET", "/v1/requests/req_x"), ("GET", "/v1/usage")],
)
def test_the_merchant_secret_key_is_required(gateway, account, method, path, authorization):
    secrets = {
        "secret_key": account.secret_key,
        "connection_secret": account.connection_secret,
        "forward_token": account.token(),
    }
    headers = {"Authorization": authorization.format(**secrets)} if authorization else {}
    response = httpx2.request(
        method, gateway.url + path, headers=headers, json=usage_body(account) if method == "POST" else None
    )

    assert_error(response, 401, "authentication_error", "invalid_secret_key")
    assert ledger_rows(gateway, account) == []
