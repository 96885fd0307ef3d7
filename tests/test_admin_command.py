"""The `meterproxy` admin command as a newcomer uses it: listing what exists, filtering the
ledger, reports with names and totals, dollars in tables and exact strings in JSON, the JSON
shapes of every command, bad ids and unknown secrets, and help on every option."""

import argparse
import json
import subprocess
from decimal import Decimal
from types import SimpleNamespace

import pytest

from meterproxy.store import Store
from scripts.admin import parser
from scripts.admin_view import dollars
from tests.backends import ledger_target
from tests.harness import ROOT, make_account
from tests.test_admin_reports import refused, table
from tests.test_commands import BIN, meterproxy
from tests.test_forward_openai import FEES
from tests.test_metering_api import seed

ON_BOTH_BACKENDS = True  # the ledgers of this module's tests (tests/conftest.py)


@pytest.fixture(scope="module")
def books(backend, tmp_path_factory):
    """Merchant `a` with two products and two wallets; merchant `b`; a metering-only row and a
    row with an error among a's."""
    db = ledger_target(backend, tmp_path_factory.mktemp("admin"))
    store = Store(db)
    a, b = make_account(store, FEES), make_account(store, FEES)
    spare = store.create_wallet("spare wallet", Decimal("2.5"))
    con2, _ = store.create_connection(a.merchant_id, spare["id"])
    prd2, _ = store.create_product(a.merchant_id, "second product", FEES)
    second = {"connection_id": con2["id"], "product_id": prd2["id"], "wallet_id": spare["id"]}
    metering_only = {"connection_id": None, "product_id": None, "wallet_id": None, "key_mode": "unmanaged"}
    failure = {"status": "error", "error_message": "provider answered HTTP 500: the fake broke", "model": "gpt-4o"}
    rows = {
        "a1": seed(store, a, "2025-03-01T10:00:00.000Z", 1000, 200, metadata={"customer": "alice"}),
        "a2": seed(store, a, "2025-03-02T09:00:00.000Z", 500, 100, **failure),
        "a3": seed(store, a, "2025-03-02T15:30:00.000Z", 2000, 300, **second, metadata={"customer": "bob"}),
        "a4": seed(store, a, "2025-03-03T09:00:00.000Z", 300, 50, **metering_only),
        "b1": seed(store, b, "2025-03-02T11:00:00.000Z", 700, 70),
    }
    store.close()
    return SimpleNamespace(db=db, a=a, b=b, con2=con2["id"], prd2=prd2["id"], spare=spare["id"], rows=rows)


def as_json(books, *args: str):
    return json.loads(meterproxy(books.db, "--json", *args))


# --- dollars -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amount, text",
    [
        ("0.0000043500", "$0.00000435"),
        ("10.0000000000", "$10.00"),
        ("0.0639100000", "$0.06391"),
        ("0.5000000000", "$0.50"),
        ("1234.5", "$1,234.50"),
        ("0E-10", "$0.00"),
        ("-0.25", "-$0.25"),
        (Decimal("0.0000000001"), "$0.0000000001"),
        (None, ""),
    ],
)
def test_dollars_keep_every_significant_digit_and_at_least_the_cents(amount, text):
    assert dollars(amount) == text


# --- list ------------------------------------------------------------------------------------------


def test_list_merchants_products_wallets_and_connections(books):
    merchants = as_json(books, "list", "merchants")
    assert [merchant["id"] for merchant in merchants] == [books.a.merchant_id, books.b.merchant_id]
    assert all("secret_hash" not in merchant for merchant in merchants)

    products = as_json(books, "list", "products", "--merchant", books.a.merchant_id)
    assert [(product["id"], product["name"]) for product in products] == [
        (books.a.product_id, "test product"),
        (books.prd2, "second product"),
    ]
    assert products[0]["fixed_fee"] == "0.0010000000"  # exact in JSON

    wallets = {wallet["id"]: wallet for wallet in as_json(books, "list", "wallets")}
    left = f"{Decimal('2.5') - Decimal(books.rows['a3']['wallet_cost']):f}"  # a3 was charged to it
    assert (wallets[books.spare]["balance"], wallets[books.spare]["available"]) == (left, left)

    connections = as_json(books, "list", "connections", "--merchant", books.a.merchant_id)
    assert [(c["id"], c["wallet"]) for c in connections] == [
        (books.a.connection_id, "test wallet"),
        (books.con2, "spare wallet"),
    ]


def test_list_tables_show_dollars_and_names(books):
    header, *lines = table(meterproxy(books.db, "list", "wallets"))
    assert header == ["id", "name", "balance", "held", "available", "created_at"]
    spare = next(line for line in lines if line[0] == books.spare)
    left = dollars(Decimal("2.5") - Decimal(books.rows["a3"]["wallet_cost"]))
    assert spare[:3] == [books.spare, "spare", "wallet"] and spare[3:6] == [left, "$0.00", left]

    output = meterproxy(books.db, "list", "products", "--merchant", books.b.merchant_id)
    header, line = table(output)
    assert header[:4] == ["id", "name", "merchant_id", "fixed_fee"]
    assert line[:2] == [books.b.product_id, "test"] and "$0.001" in line


# --- requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filters, names",
    [
        ([], ["a4", "a3", "b1", "a2", "a1"]),
        (["--status", "error"], ["a2"]),
        (["--model", "gpt-4o"], ["a2"]),
        (["--merchant", "{a.merchant_id}"], ["a4", "a3", "a2", "a1"]),
        (["--connection", "{con2}"], ["a3"]),
        (["--product", "{a.product_id}"], ["a2", "a1"]),
        (["--since", "2025-03-02", "--until", "2025-03-02T15:30:00Z"], ["b1", "a2"]),
        (["--merchant", "{b.merchant_id}", "--status", "completed"], ["b1"]),
        (["--limit", "2"], ["a4", "a3"]),
    ],
    ids=["all", "status", "model", "merchant", "connection", "product", "time", "combined", "limit"],
)
def test_requests_filters(books, filters, names):
    filters = [value.format(**vars(books)) for value in filters]
    rows = as_json(books, "requests", *filters)
    assert [row["request_id"] for row in rows] == [books.rows[name]["request_id"] for name in names]


def test_requests_table_shows_the_error_message_and_dollars(books):
    output = meterproxy(books.db, "requests", "--status", "error")
    columns = "request_id created_at status provider model key_mode input_tokens output_tokens total_cost wallet_cost"
    assert output.splitlines()[0].split() == [*columns.split(), "error_message"]
    line = output.splitlines()[2]
    assert line.rstrip().endswith("provider answered HTTP 500: the fake broke")
    assert f" {dollars(books.rows['a2']['total_cost'])} " in line


# --- report ----------------------------------------------------------------------------------------


def test_report_shows_names_beside_ids_a_totals_row_and_labels_untagged_rows(books):
    header, first, second, metering_only, total = table(
        meterproxy(books.db, "report", "--by", "product", "--merchant", books.a.merchant_id)
    )
    assert header == ["product", "name", "requests", "input_tokens", "output_tokens", *COSTS]
    assert first[:5] == [books.a.product_id, "test", "product", "2", "1500"]  # a1, a2
    assert second[:5] == [books.prd2, "second", "product", "1", "2000"]
    assert metering_only[:3] == ["(metering", "only)", "1"]
    assert total[:4] == ["total", "4", "3800", "650"]
    assert total[4:] == [dollars(sum(Decimal(books.rows[n][c]) for n in ("a1", "a2", "a3", "a4"))) for c in COSTS]

    untagged = table(meterproxy(books.db, "report", "--by", "metadata.customer", "--merchant", books.a.merchant_id))
    assert [line[0] for line in untagged] == ["metadata.customer", "alice", "bob", "(untagged)", "total"]


def test_report_by_several_groupings_names_and_labels_each(books):
    header, *lines, total = table(
        meterproxy(books.db, "report", "--by", "connection,model", "--merchant", books.a.merchant_id)
    )
    assert header[:4] == ["connection", "wallet", "model", "requests"]
    assert [line[:5] for line in lines] == [
        [books.a.connection_id, "test", "wallet", "gpt-4o", "1"],  # a2
        [books.a.connection_id, "test", "wallet", "gpt-4o-mini", "1"],  # a1
        [books.con2, "spare", "wallet", "gpt-4o-mini", "1"],  # a3
        ["(metering", "only)", "gpt-4o-mini", "1", "300"],  # a4: no connection, so no wallet either
    ]
    assert total[:2] == ["total", "4"]


def test_report_json_keeps_exact_strings_names_and_null_keys(books):
    groups = as_json(books, "report", "--by", "connection", "--merchant", books.a.merchant_id)
    assert [(group["connection"], group["wallet"], group["requests"]) for group in groups] == [
        (books.a.connection_id, "test wallet", 2),
        (books.con2, "spare wallet", 1),
        (None, None, 1),
    ]
    assert groups[1]["total_cost"] == books.rows["a3"]["total_cost"]  # the ledger's own text, 10 places


COSTS = ["total_cost", "wallet_cost", "merchant_cost"]


# --- JSON shapes ------------------------------------------------------------------------------------


def test_json_is_an_object_for_one_thing_and_an_array_for_lists(backend, tmp_path):
    db = ledger_target(backend, tmp_path)
    run = lambda *args: json.loads(meterproxy(db, "--json", *args))  # noqa: E731
    merchant = run("merchant", "create", "Acme")
    product = run("product", "create", "Chat", "--merchant", merchant["id"])
    wallet = run("wallet", "create", "Customer", "--balance", "1")
    connection = run("connection", "create", "--merchant", merchant["id"], "--wallet", wallet["id"])
    secrets = ["--secret-key", merchant["secret_key"], "--connection-secret", connection["connection_secret"]]
    secrets += ["--product-secret", product["product_secret"]]
    ones = [
        merchant,
        product,
        wallet,
        connection,
        run("wallet", "top-up", wallet["id"], "2"),
        run("wallet", "show", wallet["id"]),
        run("token", "mint", *secrets),
        run("cache", "purge", product["id"]),
        run("connection", "revoke", connection["id"]),
        run("quickstart"),
    ]
    lists = [run("list", kind) for kind in ("merchants", "products", "wallets", "connections")]
    lists += [run("requests"), run("report"), run("cache", "stats")]
    assert all(isinstance(one, dict) for one in ones), ones
    assert all(isinstance(many, list) for many in lists), lists
    assert ones[4]["balance"] == "3.0000000000"  # money: exact decimal strings
    assert (ones[-1]["created"], ones[-2]["revoked_at"] is not None) == (False, True)


# --- bad ids and secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, line",
    [
        (["wallet", "show", "wal_nope"], "no wallet wal_nope"),
        (["wallet", "top-up", "wal_nope", "1"], "no wallet wal_nope"),
        (["connection", "revoke", "con_nope"], "no connection con_nope"),
        (["connection", "create", "--merchant", "mer_nope", "--wallet", "wal_nope"], "no merchant mer_nope"),
        (["product", "create", "X", "--merchant", "mer_nope"], "no merchant mer_nope"),
        (["cache", "purge", "prd_nope"], "no product prd_nope"),
        (["cache", "stats", "--merchant", "mer_nope"], "no merchant mer_nope"),
        (["list", "products", "--merchant", "mer_nope"], "no merchant mer_nope"),
        (["requests", "--connection", "con_nope"], "no connection con_nope"),
        (["requests", "--product", "prd_nope"], "no product prd_nope"),
        (["report", "--merchant", "mer_nope"], "no merchant mer_nope"),
    ],
)
def test_an_unknown_id_exits_non_zero_with_one_line(books, args, line):
    for output in ([], ["--json"]):
        result = refused(books.db, *output, *args)
        assert (result.returncode, result.stderr) == (1, f"meterproxy: {line}\n")


def mint(db, *args: str) -> str:
    """`token mint`'s output: the token, made of the secrets it was given. Printing it is the
    command's purpose, so its output is not handed to the key-leak search (tests/leaks.py)."""
    command = [BIN / "meterproxy", "--db", str(db), "token", "mint", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_token_mint_checks_the_secrets_against_the_database(books):
    a = books.a
    good = ["--secret-key", a.secret_key, "--connection-secret", a.connection_secret, "--product-secret"]
    minted = json.loads(mint(books.db, "--json", *good, a.product_secret))
    assert (minted["merchant_id"], minted["connection_id"], minted["wallet_id"], minted["product_id"]) == (
        a.merchant_id,
        a.connection_id,
        a.wallet_id,
        a.product_id,
    )
    assert (minted["key_mode"], minted["checked"]) == ("managed", True)
    assert mint(books.db, *good, a.product_secret).strip() == minted["token"]

    for secrets, reason in [
        (["--secret-key", "msk_nope", "--provider-key", "sk-own"], "unknown secret key"),
        ([*good, books.b.product_secret], "unknown product"),  # b's product, a's merchant
        ([*good[:3], "csk_nope", "--product-secret", a.product_secret], "unknown or revoked connection"),
    ]:
        result = refused(books.db, "token", "mint", *secrets)
        assert result.returncode == 2
        assert result.stderr.startswith(f"meterproxy: {reason} in this ledger: the gateway would refuse this token")
        assert result.stderr.count("\n") == 1 and "msk_nope" not in result.stderr


def test_token_mint_without_the_check_says_so(books):
    mint = ["token", "mint", "--secret-key", "msk_nope", "--provider-key", "k", "--no-check"]
    result = subprocess.run([BIN / "meterproxy", "--db", str(books.db), *mint], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip()
    assert result.stderr.startswith("meterproxy: not checked against")


# --- help -------------------------------------------------------------------------------------------


def every_parser(root: argparse.ArgumentParser, path=("meterproxy",)):
    yield path, root
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_parser(sub, (*path, name))


def test_every_option_and_command_has_help():
    missing = []
    for path, sub in every_parser(parser()):
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [(*path, choice.dest) for choice in action._choices_actions if not choice.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append((*path, action.dest))
    assert missing == []


def test_the_wrapper_runs_the_command_in_the_projects_environment(tmp_path):
    """`scripts/meterproxy`, as the README and the gateway's hints say."""
    command = ["bash", str(ROOT / "scripts" / "meterproxy"), "--db", str(tmp_path / "w.sqlite"), "--json"]
    result = subprocess.run([*command, "list", "wallets"], capture_output=True, text=True, cwd=tmp_path)
    assert (result.returncode, json.loads(result.stdout)) == (0, [])
