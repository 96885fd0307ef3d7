"""The `meterproxy` admin command, run as a subprocess: reports over a ledger filled through the
Store, wallets with holds, revoking a connection under a running gateway, minting tokens and
creating products with every rate."""

import json
import subprocess
import time
from decimal import Decimal
from types import SimpleNamespace

import openai
import pytest

from meterproxy.ids import new_id
from meterproxy.store import PRINCIPAL_STALENESS, Store, utc_now
from pricing.fees import Payer, ProductFees
from scripts.admin_view import dollars
from tests.backends import ledger_target
from tests.harness import make_account, run
from tests.test_commands import BIN, meterproxy
from tests.test_forward_openai import FEES, MESSAGES, client_for
from tests.test_metering_api import api, assert_error, seed, totals, usage_body

ON_BOTH_BACKENDS = True  # the gateway and the ledgers of this module's tests (tests/conftest.py)
REPORT_COLUMNS = ["requests", "input_tokens", "output_tokens", "total_cost", "wallet_cost", "merchant_cost"]


def refused(db, *args: str) -> subprocess.CompletedProcess:
    """Run a command that must fail; its stdout must stay empty."""
    result = run([BIN / "meterproxy", "--db", str(db), *args])
    assert result.stdout == ""
    return result


def table(output: str) -> list[list[str]]:
    """A printed table as its header and data lines, split into cells (the rule line dropped)."""
    header, rule, *lines = output.strip().splitlines()
    assert set(rule) <= {"-", " "}
    return [header.split(), *(line.split() for line in lines)]


@pytest.fixture(scope="module")
def ledger(backend, tmp_path_factory):
    """Merchant `a` (two connections, two products, two models, three days) and merchant `b`."""
    db = ledger_target(backend, tmp_path_factory.mktemp("reports"))
    store = Store(db)
    a, b = make_account(store, FEES), make_account(store, FEES)
    con2, _ = store.create_connection(a.merchant_id, a.wallet_id)
    prd2, _ = store.create_product(a.merchant_id, "second product", FEES)
    second = {"connection_id": con2["id"], "product_id": prd2["id"]}
    rows = {
        "a1": seed(store, a, "2025-03-01T10:00:00.000Z", 1000, 200, metadata={"customer": "alice"}),
        "a2": seed(store, a, "2025-03-02T00:00:00.500Z", 500, 100, model="gpt-4o", metadata={"customer": "bob"}),
        "a3": seed(store, a, "2025-03-02T15:30:00.000Z", 2000, 300, **second, metadata={"customer": "alice"}),
        "a4": seed(store, a, "2025-03-03T09:00:00.000Z", 300, 50, model="gpt-4o", connection_id=con2["id"]),
        "b1": seed(store, b, "2025-03-02T11:00:00.000Z", 700, 70, metadata={"customer": "alice"}),
    }
    store.close()
    return SimpleNamespace(db=db, a=a, b=b, con2=con2["id"], prd2=prd2["id"], rows=rows)


NAMES = {
    "product": ("name", {"{a.product_id}": "test product", "{prd2}": "second product"}),
    "connection": ("wallet", {}),  # both connections pay from merchant a's wallet, "test wallet"
}


def expected(ledger, by: str, groups: list[tuple[str | None, list[str]]]) -> list[dict]:
    """Report lines: each group's key (`{a.connection_id}` etc. filled in), the name beside it
    (a product's, a connection's wallet's), and its rows' totals."""
    column, names = NAMES.get(by, (None, {}))
    return [
        {
            by: key and key.format(**vars(ledger)),
            **({column: names.get(key, "test wallet")} if column else {}),
            **totals([ledger.rows[name] for name in names_]),
        }
        for key, names_ in groups
    ]


def report(ledger, *args: str) -> list[dict]:
    return json.loads(meterproxy(ledger.db, "--json", "report", *args))


GROUPINGS = {  # merchant a's groups, in the order the report sorts them
    "connection": [("{a.connection_id}", ["a1", "a2"]), ("{con2}", ["a3", "a4"])],
    "product": [("{a.product_id}", ["a1", "a2", "a4"]), ("{prd2}", ["a3"])],
    "model": [("gpt-4o", ["a2", "a4"]), ("gpt-4o-mini", ["a1", "a3"])],
    "day": [("2025-03-01", ["a1"]), ("2025-03-02", ["a2", "a3"]), ("2025-03-03", ["a4"])],
    "metadata.customer": [("alice", ["a1", "a3"]), ("bob", ["a2"]), (None, ["a4"])],
}


@pytest.mark.parametrize("by", GROUPINGS)
def test_report_json_sums_each_group_exactly(ledger, by):
    assert report(ledger, "--by", by, "--merchant", ledger.a.merchant_id) == expected(ledger, by, GROUPINGS[by])


def test_report_table_has_the_grouping_and_the_totals(ledger):
    output = meterproxy(ledger.db, "report", "--by", "model", "--merchant", ledger.a.merchant_id)

    header, gpt_4o, gpt_4o_mini, total = table(output)
    sums = totals([ledger.rows["a2"], ledger.rows["a4"]])
    everything = totals([ledger.rows[name] for name in ("a1", "a2", "a3", "a4")])
    assert header == ["model", *REPORT_COLUMNS]
    assert gpt_4o == ["gpt-4o", *(shown(column, sums[column]) for column in REPORT_COLUMNS)]
    assert gpt_4o_mini[:2] == ["gpt-4o-mini", "2"]
    assert total == ["total", *(shown(column, everything[column]) for column in REPORT_COLUMNS)]


def shown(column: str, value) -> str:
    """A figure as a table shows it: money as dollars."""
    return dollars(value) if column.endswith("_cost") else str(value)


def test_report_covers_every_merchant_unless_one_is_named(ledger):
    everyone = report(ledger, "--by", "model")
    only_b = report(ledger, "--by", "model", "--merchant", ledger.b.merchant_id)

    assert everyone == expected(ledger, "model", [("gpt-4o", ["a2", "a4"]), ("gpt-4o-mini", ["a1", "a3", "b1"])])
    assert only_b == expected(ledger, "model", [("gpt-4o-mini", ["b1"])])
    unknown = refused(ledger.db, "report", "--merchant", "mer_unknown")
    assert (unknown.returncode, unknown.stderr) == (1, "meterproxy: no merchant mer_unknown\n")
    assert report(ledger, "--merchant", ledger.a.merchant_id, "--since", "2030-01-01") == []
    later = ["--merchant", ledger.a.merchant_id, "--since", "2030-01-01"]
    assert meterproxy(ledger.db, "report", *later).strip() == "(none)"


@pytest.mark.parametrize(
    "window, groups",
    [
        (["--since", "2025-03-02", "--until", "2025-03-03"], [("2025-03-02", ["a2", "a3"])]),
        (["--since", "2025-03-02T00:00:00.500Z", "--until", "2025-03-02T15:30:00.000Z"], [("2025-03-02", ["a2"])]),
        (["--since", "2025-03-02T15:30:00.000Z"], [("2025-03-02", ["a3"]), ("2025-03-03", ["a4"])]),
        (["--until", "2025-03-02"], [("2025-03-01", ["a1"])]),
    ],
    ids=["dates", "since inclusive, until exclusive", "since only", "until only"],
)
def test_report_time_window(ledger, window, groups):
    assert report(ledger, "--by", "day", "--merchant", ledger.a.merchant_id, *window) == expected(ledger, "day", groups)


@pytest.mark.parametrize(
    "since, until",
    [("2025-03-02T00:00:00Z", "2025-03-03T00:00:00Z"), ("2025-03-02T01:00:00+01:00", "2025-03-03T01:00:00+01:00")],
    ids=["Z without milliseconds", "offset"],
)
def test_report_time_window_accepts_any_iso_8601_time(ledger, since, until):
    window = ["--since", since, "--until", until]
    march_2 = expected(ledger, "day", [("2025-03-02", ["a2", "a3"])])
    assert report(ledger, "--by", "day", "--merchant", ledger.a.merchant_id, *window) == march_2


def test_report_by_an_unknown_grouping_is_a_usage_error(ledger):
    result = refused(ledger.db, "report", "--by", "colour")

    assert result.returncode == 2
    assert result.stderr.startswith("meterproxy: cannot group by 'colour'")
    assert all(grouping in result.stderr for grouping in ("connection", "product", "model", "day", "metadata.<key>"))


def test_wallet_show_gives_balance_held_and_available(backend, tmp_path):
    db = ledger_target(backend, tmp_path)
    store = Store(db)
    wallet = store.create_wallet("Customer", Decimal("5"))
    with store.transaction():  # a request in flight, as the gateway opens it
        row = {"request_id": new_id("req"), "wallet_id": wallet["id"], "created_at": utc_now(), "metadata": {}}
        store.open_request(row, Decimal("1.25"))
    store.close()

    shown = json.loads(meterproxy(db, "--json", "wallet", "show", wallet["id"]))
    header, line = table(meterproxy(db, "wallet", "show", wallet["id"]))

    amounts = {"balance": "5.0000000000", "held": "1.2500000000", "available": "3.7500000000"}
    assert shown == {**wallet, **amounts}
    assert header == ["id", "created_at", "name", "balance", "held", "available"]
    assert line == [wallet["id"], wallet["created_at"], "Customer", "$5.00", "$1.25", "$3.75"]


def test_a_revoked_connection_is_refused_by_the_running_gateway(gateway, fake):
    account = make_account(gateway.store, FEES)
    client = client_for(gateway, account.token())
    served = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert gateway.row(served.headers["x-lava-request-id"])["status"] == "completed"
    balance = gateway.store.wallet_balance(account.wallet_id)

    revoked = json.loads(meterproxy(gateway.db, "--json", "connection", "revoke", account.connection_id))
    time.sleep(PRINCIPAL_STALENESS)  # every gateway refuses it within that time (docs/ledger.md)
    with pytest.raises(openai.AuthenticationError) as refusal:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert revoked["id"] == account.connection_id and revoked["revoked_at"].endswith("Z")
    assert "secret_hash" not in revoked
    assert (refusal.value.status_code, refusal.value.code) == (401, "invalid_connection")
    assert gateway.store.request(refusal.value.response.headers["x-lava-request-id"]) is None
    assert len(fake.requests()) == 1  # only the call made before the revocation went upstream
    with api(gateway, account.secret_key) as metering:
        response = metering.post("/v1/requests", json=usage_body(account))
    assert_error(response, 401, "authentication_error", "invalid_connection")
    assert gateway.store.wallet_balance(account.wallet_id) == balance


@pytest.mark.parametrize(
    "secrets, reason",
    [
        (["--connection-secret", "csk_only_connection"], "connection_secret and product_secret go together"),
        (["--product-secret", "psk_only_product"], "connection_secret and product_secret go together"),
        ([], "needs a provider_key"),
    ],
    ids=["connection without product", "product without connection", "nothing to bill or key"],
)
def test_token_mint_refuses_a_token_the_gateway_would_refuse(backend, tmp_path, secrets, reason):
    result = refused(ledger_target(backend, tmp_path), "token", "mint", "--secret-key", "msk_merchant", *secrets)

    assert result.returncode == 2
    assert reason in result.stderr
    assert all(secret not in result.stderr for secret in ("msk_merchant", *secrets[1:]))


def test_product_create_stores_every_rate(backend, tmp_path):
    db = ledger_target(backend, tmp_path)
    merchant = json.loads(meterproxy(db, "--json", "merchant", "create", "Acme"))
    rates = {
        "--fixed-fee": "0.002",
        "--markup-percent": "12.5",
        "--input-token-rate": "0.3",
        "--output-token-rate": "1.2",
        "--character-rate": "15",
        "--second-rate": "0.006",
        "--request-cap": "0.5",
        "--payer": "merchant",
    }
    flags = [part for flag_and_value in rates.items() for part in flag_and_value]
    product = json.loads(meterproxy(db, "--json", "product", "create", "Voice", "--merchant", merchant["id"], *flags))

    assert product == {
        **product,
        "merchant_id": merchant["id"],
        "name": "Voice",
        "fixed_fee": "0.0020000000",
        "markup_percent": "12.5",
        "input_token_rate": "0.3",
        "output_token_rate": "1.2",
        "character_rate": "15",
        "second_rate": "0.006",
        "request_cap": "0.5000000000",
        "provider_cost_payer": "merchant",
    }
    assert product["id"].startswith("prd_") and product["product_secret"].startswith("psk_")
    store = Store(db)  # what the gateway will charge with: the fees behind the product's secret
    wallet = store.create_wallet("Customer")
    _, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    fees = store.principal(merchant["id"], connection_secret, product["product_secret"]).fees
    store.close()
    assert fees == ProductFees(
        fixed_fee=Decimal("0.002"),
        markup_percent=Decimal("12.5"),
        input_token_rate=Decimal("0.3"),
        output_token_rate=Decimal("1.2"),
        character_rate=Decimal("15"),
        second_rate=Decimal("0.006"),
        request_cap=Decimal("0.5"),
        provider_cost_payer=Payer.MERCHANT,
    )
