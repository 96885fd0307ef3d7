"""Versioned migrations (SPEC §9): a ledger written by the last release before them
(tests/fixtures/ledger-release-3a833e1.sqlite, made by tests/fixtures/make_release_ledger.py)
upgrades in place when a gateway starts on it, its rows, holds and secrets intact."""

import json
import shutil
import sqlite3
from decimal import Decimal
from pathlib import Path

import httpx2
import openai

from meterproxy.api_models import RequestRecord
from meterproxy.schema import LATEST, MIGRATIONS, migrate, version
from meterproxy.store import INTERRUPTED, Store
from meterproxy.token import encode_token
from tests.harness import Gateway, secret

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE = FIXTURES / "ledger-release-3a833e1.sqlite"
ACCOUNT = json.loads((FIXTURES / "ledger-release-3a833e1.json").read_text())
PENDING = "req_01RELEASE0PENDING000000"
COSTS = ("total_cost", "wallet_cost", "merchant_cost")


def raw_rows(path: Path, table: str, order: str) -> list[dict]:
    """What the file holds, read without this release's code."""
    connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(f"SELECT * FROM {table} ORDER BY {order}")]
    finally:
        connection.close()


def test_a_ledger_of_the_last_release_upgrades_in_place_and_reads_back_the_same(fake, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    shutil.copy(RELEASE, ledger)
    before = raw_rows(ledger, "requests", "request_id")
    accounts = {table: raw_rows(ledger, table, "id") for table in ("merchants", "products", "connections", "audit")}
    [wallet_before] = raw_rows(ledger, "wallets", "id")
    cached_before = raw_rows(ledger, "cache_entries", "key")

    gateway = Gateway(tmp_path, fake, db=str(ledger))
    try:
        migrations = gateway.store.db.rows("SELECT version FROM schema_migrations ORDER BY version")
        assert [row["version"] for row in migrations] == [number for number, _, _ in MIGRATIONS] == [1, 2]
        # Every row as the API gave it before, but the one the release left pending: its
        # gateway is gone, so the first gateway to start took it for interrupted and released its hold.
        api = httpx2.Client(base_url=gateway.url, headers={"authorization": f"Bearer {secret(ACCOUNT['secret_key'])}"})
        for row in before:
            answered = api.get(f"/v1/requests/{row['request_id']}").json()
            expected = RequestRecord.from_row(row).model_dump(mode="json")
            if row["request_id"] == PENDING:
                recovered = {"status": "error", "error_message": INTERRUPTED, **dict.fromkeys(COSTS, "0.0000000000")}
                assert {name: answered.pop(name) for name in recovered} == recovered
                assert answered.pop("completed_at") > row["created_at"]
                expected = {name: value for name, value in expected.items() if name not in (*recovered, "completed_at")}
            assert answered == expected
        assert {table: raw_rows(ledger, table, "id") for table in accounts} == accounts
        assert [{**entry, "hits": 0} for entry in raw_rows(ledger, "cache_entries", "key")] == cached_before
        wallet = gateway.store.wallet(ACCOUNT["wallet_id"])
        assert (wallet["balance"], wallet["held"]) == (wallet_before["balance"], "0.0000000000")
        assert Decimal(wallet_before["balance"]) == Decimal(5) - Decimal("0.000506") - Decimal("0.000545")

        # The secrets still authenticate: a call made with them is metered and charged.
        forward = secret(
            encode_token(
                secret_key=ACCOUNT["secret_key"],
                connection_secret=secret(ACCOUNT["connection_secret"]),
                product_secret=secret(ACCOUNT["product_secret"]),
            )
        )
        client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=forward, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        row = gateway.row(raw.headers["x-lava-request-id"])
        assert row["status"] == "completed" and Decimal(row["wallet_cost"]) > 0
    finally:
        gateway.stop()


def test_migrations_run_once_and_an_up_to_date_ledger_is_left_alone(tmp_path):
    path = tmp_path / "ledger.sqlite"
    store = Store(path)
    assert (store.migrated, version(store.db)) == ([1, 2], LATEST)
    store.close()
    again = Store(path)
    try:
        assert again.migrated == [] and migrate(again.db) == []
    finally:
        again.close()
