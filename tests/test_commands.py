"""The README's commands and the `meterproxy` admin command, run as a user runs them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx2

from meterproxy.store import Store
from meterproxy.token import decode_token
from tests.harness import LEAKS, MANAGED_KEYS, _start, _stop, run, secret

BIN = Path(sys.executable).parent


def meterproxy(db: Path, *args: str) -> str:
    result = run([BIN / "meterproxy", "--db", str(db), *args], check=True)
    return result.stdout


def test_pip_check_is_clean():
    """mitmproxy 12 takes h11 0.16 itself: the environment installs with no override of any pin."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.stdout.strip() == "No broken requirements found."


def test_the_gateway_command_prints_a_first_request_that_works(tmp_path, fake):
    """`scripts/gateway` on a fresh database: its printed curl line, sent as printed, is served."""
    providers = tmp_path / "providers.toml"
    providers.write_text(f'[providers.openai]\nupstream = "{fake.url}/openai"\n')
    env = {
        **os.environ,
        "METERPROXY_DB": str(tmp_path / "fresh.sqlite"),
        "METERPROXY_PORT": "0",
        "OPENAI_API_KEY": MANAGED_KEYS["OPENAI_API_KEY"],
    }
    process, match, output = _start(
        ["bash", "scripts/gateway", "--set", f"meterproxy_providers={providers}", "--set", f"confdir={tmp_path}"],
        r"proxy listening at 127\.0\.0\.1:(\d+)",
        env,
    )
    started = len(output)  # the token is printed once, before the gateway starts; never after

    def left_behind() -> bytes:
        files = b"".join(path.read_bytes() for path in tmp_path.glob("fresh.sqlite*"))
        return files + "".join(output[started:]).encode()

    LEAKS.watch("scripts/gateway", left_behind)
    try:
        printed = "".join(output)
        curl = re.search(
            r"curl '(?P<url>[^']+)' \\\n\s+-H '(?P<auth>[^']+)' -H '(?P<type>[^']+)' \\\n\s+-d '(?P<body>[^']+)'",
            printed,
        )
        assert curl, printed
        url = curl["url"].replace(":0/", f":{match.group(1)}/")  # the port was chosen by the OS
        headers = dict(header.split(": ", 1) for header in (curl["auth"], curl["type"]))
        token = secret(headers["Authorization"].removeprefix("Bearer "))
        for value in decode_token(token).model_dump().values():
            if value:
                secret(value)
        response = httpx2.post(url, headers=headers, content=curl["body"])
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4"
        store = Store(tmp_path / "fresh.sqlite")
        assert store.request(response.headers["x-lava-request-id"])["merchant_id"].startswith("mer_")
        store.close()
    finally:
        _stop(process)


def test_admin_command_creates_accounts_shows_secrets_once_and_stores_them_hashed(tmp_path):
    db = tmp_path / "admin.sqlite"
    merchant = json.loads(meterproxy(db, "--json", "merchant", "create", "Acme"))
    product = json.loads(
        meterproxy(
            db,
            "--json",
            "product",
            "create",
            "Chat",
            "--merchant",
            merchant["id"],
            "--fixed-fee",
            "0.001",
            "--markup-percent",
            "12.5",
            "--payer",
            "merchant",
        )
    )
    wallet = json.loads(meterproxy(db, "--json", "wallet", "create", "Customer", "--balance", "5"))
    connection = json.loads(
        meterproxy(db, "--json", "connection", "create", "--merchant", merchant["id"], "--wallet", wallet["id"])
    )
    topped = json.loads(meterproxy(db, "--json", "wallet", "top-up", wallet["id"], "2.5"))
    token = meterproxy(
        db,
        "token",
        "mint",
        "--secret-key",
        merchant["secret_key"],
        "--connection-secret",
        connection["connection_secret"],
        "--product-secret",
        product["product_secret"],
    ).strip()

    assert (product["fixed_fee"], product["markup_percent"], product["provider_cost_payer"]) == (
        "0.0010000000",
        "12.5",
        "merchant",
    )
    assert topped["balance"] == "7.5000000000"
    store = Store(db)
    principal = store.authorize(decode_token(token))
    assert (principal.merchant_id, principal.connection_id, principal.product_id, principal.wallet_id) == (
        merchant["id"],
        connection["id"],
        product["id"],
        wallet["id"],
    )
    store.close()
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("admin.sqlite*"))
    for value in (merchant["secret_key"], product["product_secret"], connection["connection_secret"]):
        assert value.encode() not in raw
    assert "secret" not in meterproxy(db, "wallet", "show", wallet["id"])


def test_admin_command_lists_ledger_rows(tmp_path):
    db = tmp_path / "empty.sqlite"
    assert meterproxy(db, "requests").strip() == "(none)"
    assert json.loads(meterproxy(db, "--json", "requests")) == []
