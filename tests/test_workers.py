"""`scripts/gateway --workers N` (SPEC §9): N gateway processes behind one port (HAProxy in TCP
mode, scripts/workers.py) on one ledger, on each backend: 200 concurrent requests on a wallet
that affords exactly 100 of them, every request recorded exactly once; a worker that dies is
restarted; SIGTERM stops them all, each completing its calls in flight."""

import os
import shutil
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx2
import openai
import pytest

from meterproxy.store import Store
from pricing.fees import ProductFees
from tests.harness import MANAGED_KEYS, ROOT, _start, _stop, make_account

FEE = Decimal("0.001")
REQUESTS = 200
AFFORDED = 100
WORKERS = 4


@pytest.fixture
def workers(ledger, fake, tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("HAProxy is not installed (scripts/test installs it where it can)")
    providers = tmp_path / "providers.toml"
    providers.write_text("".join(f'[providers.{name}]\nupstream = "{fake.url}/{name}"\n\n' for name in ("openai",)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
    environment.update(MANAGED_KEYS, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    process, _, output = _start(
        [
            sys.executable,
            "scripts/workers.py",
            str(WORKERS),
            "127.0.0.1",
            str(port),
            "--",
            "--set",
            f"confdir={tmp_path / 'mitmproxy'}",
            "-s",
            str(ROOT / "addons" / "gateway.py"),
            "--set",
            f"meterproxy_db={ledger}",
            "--set",
            f"meterproxy_providers={providers}",
        ],
        r"meterproxy: \d+ workers serving at",
        environment,
    )
    store = Store(ledger)
    yield f"http://127.0.0.1:{port}", store, process, output
    _stop(process)
    store.close()


def test_four_workers_behind_one_port_spend_exactly_what_the_wallet_has(workers, fake):
    url, store, _, _ = workers
    account = make_account(store, ProductFees(fixed_fee=FEE), balance=FEE * AFFORDED)
    token = account.token(provider_key="sk-customer-own-key-77d1")
    fake.behave(*[{"first_byte_delay": 0.3}] * REQUESTS)  # keep them in flight together
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    with httpx2.Client(timeout=120, limits=httpx2.Limits(max_connections=REQUESTS)) as client:

        def one_request(_: int) -> tuple[int, str]:
            response = client.post(
                f"{url}/openai/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
            )
            return response.status_code, response.headers["x-lava-request-id"]

        with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
            outcomes = list(pool.map(one_request, range(REQUESTS)))

    served = [request_id for status, request_id in outcomes if status == 200]
    refused = [request_id for status, request_id in outcomes if status == 402]
    assert (len(served), len(refused)) == (AFFORDED, REQUESTS - AFFORDED)
    deadline = time.monotonic() + 30
    while store.db.scalar("SELECT COUNT(*) FROM requests WHERE status = 'pending'"):
        assert time.monotonic() < deadline, "rows still pending"
        time.sleep(0.05)
    rows = store.db.rows("SELECT request_id, status, wallet_cost, gateway_id FROM requests")
    assert sorted(row["request_id"] for row in rows) == sorted(served)  # one row each, none for a 402
    assert {(row["status"], row["wallet_cost"]) for row in rows} == {("completed", f"{FEE:.10f}")}
    while store.db.scalar("SELECT COUNT(*) FROM audit") < len(refused):
        assert time.monotonic() < deadline, "refusals not audited"
        time.sleep(0.05)
    audited = store.db.rows("SELECT request_id, code FROM audit")
    assert sorted(entry["request_id"] for entry in audited) == sorted(refused)
    assert {entry["code"] for entry in audited} == {"insufficient_balance"}
    wallet = store.wallet(account.wallet_id)
    assert (wallet["balance"], wallet["held"]) == ("0.0000000000", "0.0000000000")
    assert store.db.scalar("SELECT COUNT(*) FROM gateways") == WORKERS


def test_a_worker_that_dies_is_restarted_and_the_port_keeps_serving(workers, fake):
    url, store, _, output = workers
    account = make_account(store)
    [victim] = store.db.rows("SELECT pid FROM gateways LIMIT 1")
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not any("restarting it" in line for line in output):
        assert time.monotonic() < deadline, "".join(output)
        time.sleep(0.05)
    while store.db.scalar("SELECT COUNT(*) FROM gateways WHERE pid != ?", [victim["pid"]]) < WORKERS:
        assert time.monotonic() < deadline, "the worker did not come back"
        time.sleep(0.05)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    statuses = [
        httpx2.post(
            f"{url}/openai/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {account.token()}"},
            timeout=30,
        ).status_code
        for _ in range(2 * WORKERS)
    ]
    assert statuses == [200] * (2 * WORKERS)


def test_sigterm_stops_every_worker_each_completing_its_calls_in_flight(workers, fake):
    url, store, process, _ = workers
    account = make_account(store)
    fake.behave(*[{"chunk_delay": 0.2, "words": 40}] * WORKERS)
    started = []

    def stream(_: int) -> None:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        headers = {"authorization": f"Bearer {account.token()}"}
        try:
            with httpx2.stream("POST", f"{url}/openai/v1/chat/completions", json=body, headers=headers) as response:
                for _ in response.iter_bytes():
                    started.append(response.headers["x-lava-request-id"])
        except httpx2.HTTPError:
            pass  # cut by the stop

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        calls = [pool.submit(stream, index) for index in range(WORKERS)]
        deadline = time.monotonic() + 30
        while len(set(started)) < WORKERS:
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        for call in calls:
            call.result()
    assert process.wait(timeout=60) == 0
    rows = store.db.rows("SELECT status, usage_source, wallet_cost FROM requests")
    assert len(rows) == WORKERS
    assert {(row["status"], row["usage_source"]) for row in rows} == {("completed", "estimated")}  # charged
    assert all(Decimal(row["wallet_cost"]) > 0 for row in rows)  # for what they delivered
    assert store.db.scalar("SELECT COUNT(*) FROM gateways") == 0  # every worker left the ledger
    assert store.wallet(account.wallet_id)["held"] == "0.0000000000"


def test_explicit_proxy_mode_works_behind_the_workers_port(workers, fake, tmp_path, monkeypatch):
    """HAProxy passes CONNECT and the TLS inside it through untouched: a legacy client with
    HTTPS_PROXY (trusting mitmproxy's CA) is metered as by a single gateway."""
    url, store, _, _ = workers
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", url)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "mitmproxy" / "mitmproxy-ca-cert.pem"))
    account = make_account(store)
    client = openai.OpenAI(api_key=account.token(), max_retries=0)  # base_url stays https://api.openai.com/v1
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    request_id = raw.headers["x-lava-request-id"]
    deadline = time.monotonic() + 30
    while (store.request(request_id) or {}).get("status") in (None, "pending"):
        assert time.monotonic() < deadline, "the row was not completed"
        time.sleep(0.02)
    row = store.request(request_id)
    assert (row["status"], row["endpoint"], row["connection_id"]) == (
        "completed",
        "POST https://api.openai.com/v1/chat/completions",
        account.connection_id,
    )
