"""Many gateways, one ledger (SPEC §9), on each backend: no wallet overdrawn by their
concurrency, rate limits and revocations that hold across all of them, and each gateway's
calls its own: a dead gateway's calls are interrupted once its lease expires, a live one's never.
Where root and `ip netns` allow, two gateways on two hosts (network namespaces) share one
PostgreSQL over veth links."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import openai
import psycopg
import pytest

from meterproxy.limits import ProductLimits
from meterproxy.store import INTERRUPTED, Store
from pricing.fees import ProductFees
from scripts.pg_cluster import Cluster, binary
from tests.harness import ROOT, Gateway, make_account
from tests.test_destinations import namespaces_unavailable
from tests.test_wallet_holds import client_for, spend_concurrently

MESSAGES = [{"role": "user", "content": "one more question"}]
FEE = Decimal("0.001")  # the whole cost of a BYOK call: held, then charged, exactly
LEASE = "2"  # seconds: a dead gateway's calls are interrupted soon after


@pytest.fixture
def two(ledger, fake, tmp_path):
    """Two gateway processes on one ledger."""
    gateways = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateways.append(Gateway(tmp_path / name, fake, db=ledger, args=("--set", f"meterproxy_lease={LEASE}")))
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()


def wait_for(condition, what: str, timeout: float = 20) -> None:
    """Poll until `condition()`; the deadline only fails a hung test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_fifty_concurrent_requests_on_two_gateways_spend_exactly_what_the_wallet_has(two, fake):
    """The wallet affords exactly ten calls: ten are answered, forty refused with 402, whichever
    gateway they reach; the balance falls by exactly the completed rows' costs, never below zero."""
    first, second = two
    account = make_account(first.store, ProductFees(fixed_fee=FEE), balance=FEE * 10)
    token = account.token(provider_key="sk-customer-own-key-2c5e")
    fake.behave(*[{"first_byte_delay": 0.2}] * 50)  # keep them in flight together
    served, refused, lowest = spend_concurrently(two, account, token)
    assert (len(served), refused) == (10, [402] * 40)
    rows = [first.row(request_id) for request_id in served]
    assert {(row["status"], row["wallet_cost"]) for row in rows} == {("completed", f"{FEE:.10f}")}
    assert sorted(row["request_id"] for row in first.rows()) == sorted(served)  # a 402 writes no row
    wallet = first.store.wallet(account.wallet_id)
    spent = sum(Decimal(row["wallet_cost"]) for row in rows)
    assert (Decimal(wallet["balance"]), wallet["held"]) == (FEE * 10 - spent, "0.0000000000")
    assert Decimal(wallet["balance"]) == 0 and lowest >= 0


def test_a_rate_limit_holds_for_the_sum_of_both_gateways(two):
    account = make_account(two[0].store, limits=ProductLimits(requests_per_minute=10))
    outcomes = []
    for index in range(20):
        try:
            client_for(two[index % 2], account.token()).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            outcomes.append(200)
        except openai.RateLimitError:
            outcomes.append(429)
    assert outcomes == [200] * 10 + [429] * 10


def test_a_revoked_connection_is_refused_by_every_gateway_within_a_second(two, ledger):
    account = make_account(two[0].store)
    clients = [client_for(gateway, account.token()) for gateway in two]
    for client in clients:  # both remember the principal now
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    meterproxy = Path(sys.executable).with_name("meterproxy")
    admin = [meterproxy, "--db", ledger, "connection", "revoke", account.connection_id]
    subprocess.run(admin, check=True, cwd=ROOT, capture_output=True)
    revoked = time.monotonic()
    time.sleep(max(0.0, revoked + 1 - time.monotonic()))  # the promise: within a second
    for client in clients:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert refused.value.code == "invalid_connection"


def test_a_gateway_killed_mid_stream_leaves_the_other_serving_and_its_calls_interrupted_after_its_lease(two, fake):
    first, second = two
    account = make_account(first.store)
    balance = first.store.wallet_balance(account.wallet_id)
    fake.behave(*[{"chunk_delay": 0.2, "words": 40}] * 4)
    delivered: dict[int, list[str]] = {0: [], 1: [], 2: [], 3: []}

    def stream(index: int) -> str | None:
        client = client_for(two[index % 2], account.token())
        try:
            with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            ) as response:
                for chunk in response.parse():
                    if chunk.choices:
                        delivered[index].append(chunk.choices[0].delta.content or "")
                return response.headers["x-lava-request-id"]
        except openai.APIConnectionError:
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        streams = [pool.submit(stream, index) for index in range(4)]
        wait_for(lambda: all(len(pieces) >= 2 for pieces in delivered.values()), "four streams under way")
        first.process.kill()  # SIGKILL: no `done` hook, no lease renewed
        first.process.wait()
        outcomes = [call.result() for call in streams]
    assert outcomes[0] is None and outcomes[2] is None  # the dead one's clients saw the cut
    kept = [outcomes[1], outcomes[3]]
    assert all(kept)
    assert {second.row(request_id)["status"] for request_id in kept} == {"completed"}

    wait_for(lambda: not [row for row in second.rows() if row["status"] == "pending"], "the lease to expire")
    rows = second.rows()
    interrupted = [row for row in rows if row["request_id"] not in kept]
    assert [(row["status"], row["error_message"], row["wallet_cost"]) for row in interrupted] == [
        ("error", INTERRUPTED, "0.0000000000")
    ] * 2
    wallet = second.store.wallet(account.wallet_id)
    spent = sum(Decimal(second.row(request_id)["wallet_cost"]) for request_id in kept)
    assert (wallet["held"], Decimal(wallet["balance"])) == ("0.0000000000", balance - spent)


def test_a_gateway_restarted_while_the_other_serves_leaves_the_others_calls_alone(two, fake, ledger, tmp_path):
    first, second = two
    account = make_account(first.store)
    fake.behave({"first_byte_delay": 3})
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(
            client_for(second, account.token()).chat.completions.with_raw_response.create,
            model="gpt-4o-mini",
            messages=MESSAGES,
        )
        wait_for(lambda: fake.requests(), "the call to reach the provider")
        first.process.kill()
        first.process.wait()
        first.stop()
        restarted = Gateway(tmp_path / "a", fake, db=ledger, args=("--set", f"meterproxy_lease={LEASE}"))
        two[0] = restarted
        raw = in_flight.result()
    row = second.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["error_message"]) == ("completed", None)


# --- two hosts: network namespaces of the test's own, PostgreSQL over veth links ---------------


@pytest.fixture
def two_hosts():
    """Two namespaces (two hosts), each linked to this one by a veth pair, and a PostgreSQL
    cluster here listening on this side of both links; yields the ledger's URL as each host
    reaches it, and the cluster."""
    if binary("initdb") is None:
        pytest.skip("PostgreSQL 15 (initdb) is not installed")
    suffix = os.getpid() % 10000
    hosts = [
        (f"mp-ledger-{name}-{suffix}", f"ml{name}{suffix}", f"mn{name}{suffix}", net)
        for name, net in (("a", "10.31.1"), ("b", "10.31.2"))
    ]
    folder = Path(tempfile.mkdtemp(prefix="meterproxy-pg-"))
    folder.chmod(0o755)  # the cluster inside it belongs to the postgres user
    cluster = None
    try:
        for namespace, here, there, net in hosts:
            for command in (
                f"netns add {namespace}",
                f"link add {here} type veth peer name {there}",
                f"link set {there} netns {namespace}",
                f"addr add {net}.1/24 dev {here}",
                f"link set {here} up",
                f"-n {namespace} link set lo up",
                f"-n {namespace} link set {there} up",
                f"-n {namespace} addr add {net}.2/24 dev {there}",
            ):
                subprocess.run(["ip", *command.split()], check=True, capture_output=True)
        cluster = Cluster(folder / "cluster", listen=("127.0.0.1", *(f"{net}.1" for *_, net in hosts)))
        cluster.create()
        with psycopg.connect(cluster.url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE ledger")
        urls = [(namespace, f"postgresql://postgres@{net}.1:{cluster.port}/ledger") for namespace, *_, net in hosts]
        yield urls, cluster
    finally:
        if cluster is not None:
            cluster.remove()
        shutil.rmtree(folder, ignore_errors=True)
        for namespace, here, *_ in hosts:  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
            subprocess.run(["ip", "link", "delete", here], capture_output=True)


@pytest.mark.skipif(namespaces_unavailable() is not None, reason=str(namespaces_unavailable()))
def test_two_gateways_on_two_hosts_share_one_postgresql_ledger_over_the_network(two_hosts):
    hosts, cluster = two_hosts
    store = Store(cluster.url.rsplit("/", 1)[0] + "/ledger")
    try:
        account = make_account(store, ProductFees(fixed_fee=FEE), balance=FEE * 10)
        token = account.token(provider_key="sk-customer-own-key-9a41")
        scenarios = [
            subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "tests/netns_ledger_scenario.py", url, token, "25"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for namespace, url in hosts
        ]
        reports = [scenario.communicate(timeout=300) for scenario in scenarios]
        for scenario, (_, errors) in zip(scenarios, reports):
            assert scenario.returncode == 0, errors[-3000:]
        outcomes = [outcome for out, _ in reports for outcome in json.loads(out.strip().splitlines()[-1])]
        served = [request_id for status, request_id in outcomes if status == 200]
        assert (len(served), [status for status, _ in outcomes].count(402)) == (10, 40)
        rows = store.db.rows("SELECT request_id, status, wallet_cost FROM requests")
        assert sorted(row["request_id"] for row in rows) == sorted(served)
        assert {(row["status"], row["wallet_cost"]) for row in rows} == {("completed", f"{FEE:.10f}")}
        wallet = store.wallet(account.wallet_id)
        assert (wallet["balance"], wallet["held"]) == ("0.0000000000", "0.0000000000")
    finally:
        store.close()
