"""Prometheus metrics at /metrics (issue 20): after a known set of calls the counters equal the
ledger's sums; only loopback clients, or the bearer of the metrics token, may scrape."""

import time
from collections import defaultdict
from decimal import Decimal

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pricing.fees import ProductFees
from tests.harness import Gateway, make_account, secret

MESSAGES = [{"role": "user", "content": "count me"}]


def scrape(gateway: Gateway, **headers) -> dict[str, list]:
    answer = httpx2.get(f"{gateway.url}/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family.samples for family in text_string_to_metric_families(answer.text)}


def sums(samples: list, name: str, *labels: str) -> dict[tuple, float]:
    totals: dict[tuple, float] = defaultdict(float)
    for sample in samples:
        if sample.name == name:
            totals[tuple(sample.labels[label] for label in labels)] += sample.value
    return dict(totals)


def test_counters_equal_the_ledgers_sums(gateway, fake):
    account = make_account(gateway.store, ProductFees(fixed_fee=Decimal("0.001"), markup_percent=Decimal(10)))
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)
    for model in ("gpt-4o-mini", "gpt-4o-mini", "gpt-4o"):
        client.chat.completions.create(model=model, messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    fake.behave({"cached_tokens": 4, "reasoning_tokens": 2})
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    fake.behave(*[{"status": 500}] * 3)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    byok = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(secret("sk-byok-metrics")))
    byok.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    recorded = httpx2.post(
        f"{gateway.url}/v1/requests",
        headers={"authorization": f"Bearer {account.secret_key}"},
        json={
            "provider": "anthropic",
            "model": "claude-3-5-haiku-latest",
            "input_tokens": 1000,
            "output_tokens": 10,
            "connection_secret": account.connection_secret,
            "product_secret": account.product_secret,
        },
    )
    assert recorded.status_code == 201
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key="bad", max_retries=0).models.list()

    rows = [row for row in gateway.rows() if row["merchant_id"] == account.merchant_id]
    assert len(rows) == 8
    deadline = time.monotonic() + 10
    while True:  # each row is counted once it has committed
        metrics = scrape(gateway)
        counted = sums(metrics["meterproxy_requests"], "meterproxy_requests_total", "status")
        if sum(counted.values()) >= len(gateway.rows()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    everything = [row for row in gateway.rows() if row["status"] != "pending"]  # the module's other tests' too

    expected_requests: dict[tuple, float] = defaultdict(float)
    expected_tokens: dict[tuple, float] = defaultdict(float)
    expected_cost: dict[tuple, Decimal] = defaultdict(Decimal)
    for row in everything:
        expected_requests[(row["provider"], row["model"], row["status"], row["key_mode"])] += 1
        for kind in ("input", "output", "cached_input", "reasoning"):
            if row[f"{kind}_tokens"]:
                expected_tokens[(row["provider"], row["model"], kind)] += row[f"{kind}_tokens"]
        if Decimal(row["total_cost"]):
            expected_cost[(row["provider"], row["model"], row["key_mode"])] += Decimal(row["total_cost"])
    requests = metrics["meterproxy_requests"]
    assert sums(requests, "meterproxy_requests_total", "provider", "model", "status", "key_mode") == expected_requests
    assert ("openai", "gpt-4o", "error", "managed") in expected_requests
    assert ("anthropic", "claude-3-5-haiku-latest", "completed", "managed") in expected_requests
    tokens = sums(metrics["meterproxy_tokens"], "meterproxy_tokens_total", "provider", "model", "kind")
    assert tokens == expected_tokens and ("openai", "gpt-4o", "cached_input") in tokens
    cost = sums(metrics["meterproxy_cost_dollars"], "meterproxy_cost_dollars_total", "provider", "model", "key_mode")
    assert cost.keys() == expected_cost.keys()
    for labels, dollars in expected_cost.items():
        assert round(Decimal(cost[labels]), 2) == round(dollars, 2)  # to the cent
        assert abs(Decimal(cost[labels]) - dollars) < Decimal("1e-9")
    assert sums(metrics["meterproxy_refusals"], "meterproxy_refusals_total", "code")[("invalid_token",)] >= 1
    durations = metrics["meterproxy_request_duration_seconds"]
    assert sum(sums(durations, "meterproxy_request_duration_seconds_count", "provider").values()) == sum(
        1 for row in everything if row["latency_ms"] is not None
    )
    added = sums(metrics["meterproxy_gateway_added_seconds"], "meterproxy_gateway_added_seconds_count")
    assert added[()] >= 6  # every forwarded call of this test
    assert sums(metrics["meterproxy_ledger_commit_seconds"], "meterproxy_ledger_commit_seconds_count")[()] > 0
    assert metrics["meterproxy_holds_in_flight"][0].value == 0
    assert metrics["meterproxy_ledger_queue_depth"][0].value >= 0


def test_metrics_need_the_token_when_one_is_set(fake, tmp_path):
    token = secret("metrics-token-4d1f")
    gateway = Gateway(tmp_path, fake, env={"METERPROXY_METRICS_TOKEN": token})
    try:
        refused = httpx2.get(f"{gateway.url}/metrics")
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_metrics_token")
        wrong = httpx2.get(f"{gateway.url}/metrics", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "meterproxy_requests" in scrape(gateway, authorization=f"Bearer {token}")
    finally:
        gateway.stop()
