"""PostgreSQL stopped under load, then started again (SPEC §9): new calls are refused with 503
ledger_unavailable and Retry-After, never forwarded unrecorded; the completions of the calls
already in flight wait and commit once the server is back; the gateways reconnect by
themselves; every call answered has exactly one row, and the wallet matches the rows to the cent.

The test runs its own cluster (it stops it), on a free loopback port."""

import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx2
import openai
import psycopg
import pytest

from meterproxy.store import Store
from pricing.fees import ProductFees
from scripts.pg_cluster import Cluster, binary
from tests.harness import Gateway, make_account

MESSAGES = [{"role": "user", "content": "one more question"}]
OUTAGE = 10  # seconds the server is down
IN_FLIGHT = 4  # calls under way when it stops


@pytest.fixture
def cluster():
    if binary("initdb") is None:
        pytest.skip("PostgreSQL 15 (initdb) is not installed")
    folder = Path(tempfile.mkdtemp(prefix="meterproxy-pg-"))
    folder.chmod(0o755)  # the cluster inside it belongs to the postgres user
    cluster = Cluster(folder / "cluster")
    try:
        cluster.create()
    except (subprocess.CalledProcessError, OSError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"a PostgreSQL cluster cannot be started here: {error} {getattr(error, 'stderr', '')}")
    yield cluster
    cluster.remove()
    shutil.rmtree(folder, ignore_errors=True)


def test_a_ledger_server_stopped_for_ten_seconds_under_load_loses_nothing(cluster, fake, tmp_path):
    with psycopg.connect(cluster.url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE ledger")
    ledger = cluster.url.rsplit("/", 1)[0] + "/ledger"
    gateways = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        gateways.append(Gateway(tmp_path / name, fake, db=ledger))
    try:
        account = make_account(gateways[0].store, ProductFees(fixed_fee=Decimal("0.001")), balance=Decimal("10"))
        start = gateways[0].store.wallet_balance(account.wallet_id)
        fake.behave(*[{"first_byte_delay": 3}] * IN_FLIGHT)
        answered, refused, lock = [], [], threading.Lock()

        def one_call(index: int) -> None:
            client = openai.OpenAI(
                base_url=f"{gateways[index % 2].url}/openai/v1", api_key=account.token(), max_retries=0, timeout=60
            )
            try:
                raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
                with lock:
                    answered.append(raw.headers["x-lava-request-id"])
            except openai.APIStatusError as error:
                assert (error.status_code, error.code) == (503, "ledger_unavailable"), error
                assert error.response.headers["retry-after"] == "1"
                with lock:
                    refused.append(error.response.headers["x-lava-request-id"])

        with ThreadPoolExecutor(max_workers=8) as pool:
            in_flight = [pool.submit(one_call, index) for index in range(IN_FLIGHT)]
            deadline = time.monotonic() + 20
            while len(fake.requests()) < IN_FLIGHT:  # admitted, and waiting for their answers
                assert time.monotonic() < deadline, "the calls did not reach the provider"
                time.sleep(0.02)
            cluster.stop("fast")  # every connection dropped
            stopped = time.monotonic()
            during = []
            while time.monotonic() < stopped + OUTAGE:  # load meanwhile
                during.append(pool.submit(one_call, len(during)))
                time.sleep(0.1)
            listing = httpx2.get(  # the metering API's reads too
                f"{gateways[0].url}/v1/requests", headers={"authorization": f"Bearer {account.secret_key}"}
            )
            for call in in_flight + during:
                call.result()
            upstream_during = len(fake.requests())
            cluster.start()
        assert len(answered) == IN_FLIGHT and len(refused) == len(during)  # every new call refused
        assert upstream_during == IN_FLIGHT  # and none of them forwarded
        assert (listing.status_code, listing.json()["error"]["code"]) == (503, "ledger_unavailable")

        # Back: the completions that waited commit, and both gateways serve again.
        for gateway in gateways:  # the test's own connections went with the server
            gateway.store = Store(ledger)
        store = gateways[0].store
        for request_id in answered:
            assert gateways[0].row(request_id, timeout=30)["status"] == "completed"
        after = []
        for index in range(2):
            deadline = time.monotonic() + 30
            while True:
                try:
                    client = openai.OpenAI(
                        base_url=f"{gateways[index].url}/openai/v1", api_key=account.token(), max_retries=0
                    )
                    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
                    after.append(raw.headers["x-lava-request-id"])
                    break
                except openai.APIStatusError as error:
                    assert error.status_code == 503 and time.monotonic() < deadline, error
                    time.sleep(0.2)
        rows = [gateways[0].row(request_id) for request_id in answered + after]
        assert {row["status"] for row in rows} == {"completed"}
        assert store.db.scalar("SELECT COUNT(*) FROM requests") == len(rows)  # one row each, none for a 503
        wallet = store.wallet(account.wallet_id)
        spent = sum(Decimal(row["wallet_cost"]) for row in rows)
        assert (Decimal(wallet["balance"]), wallet["held"]) == (start - spent, "0.0000000000")
        assert spent > 0
    finally:
        for gateway in gateways:
            gateway.stop()
