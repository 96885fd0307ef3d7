"""The gateway's own limits (SPEC §7): per-connection requests and tokens per minute (429 with
Retry-After and x-ratelimit-* headers) and the request body size (413). Refusals are audited,
never charged, and never reach the provider."""

import json

import httpx2
import openai
import pytest

from meterproxy.limits import ProductLimits, RateWindow
from tests.harness import Gateway, make_account

MESSAGES = [{"role": "user", "content": "hello"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RateLimiter:
    """What the ledger does with a RateWindow: judge a request against the connection's
    admissions (the ledger's rows) and, if it is allowed, add it to them."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.admitted: dict[str, list[tuple[float, int]]] = {}

    def admit(self, key: str, limits: ProductLimits, tokens: int):
        admitted = self.admitted.setdefault(key, [])
        verdict = RateWindow(admitted).verdict(limits, tokens, self.clock())
        if verdict.allowed:
            admitted.append((self.clock(), tokens))
        return verdict


def test_requests_per_minute_slide_with_the_window():
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = ProductLimits(requests_per_minute=2)
    assert limiter.admit("con", limits, 0).allowed
    clock.now += 10
    first_left = limiter.admit("con", limits, 0)
    assert first_left.allowed and first_left.headers["x-ratelimit-remaining-requests"] == "0"
    refused = limiter.admit("con", limits, 0)
    assert not refused.allowed
    assert refused.headers["retry-after"] == "50"  # the first request leaves the window in 50 s
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert limiter.admit("other", limits, 0).allowed  # per connection
    clock.now += 50
    assert limiter.admit("con", limits, 0).allowed


def test_tokens_per_minute_count_each_requests_tokens():
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = ProductLimits(tokens_per_minute=100)
    assert limiter.admit("con", limits, 60).headers["x-ratelimit-remaining-tokens"] == "40"
    clock.now += 5
    refused = limiter.admit("con", limits, 50)
    assert not refused.allowed and refused.headers["retry-after"] == "55"
    assert limiter.admit("con", limits, 40).allowed
    assert not limiter.admit("con", ProductLimits(tokens_per_minute=100), 101).allowed


def test_tokens_leave_the_window_with_their_requests():
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = ProductLimits(tokens_per_minute=100)
    for _ in range(6):
        assert limiter.admit("busy", limits, 10).allowed
    clock.now += 61  # all of it left the window
    verdict = limiter.admit("busy", limits, 90)
    assert verdict.allowed and verdict.headers["x-ratelimit-remaining-tokens"] == "10"


def test_no_limits_admit_everything():
    limiter = RateLimiter(Clock())
    assert all(limiter.admit("con", ProductLimits(), 10**9).allowed for _ in range(1000))


@pytest.fixture(scope="module")
def gateway(fake, tmp_path_factory):
    gateway = Gateway(tmp_path_factory.mktemp("limits"), fake, args=("--set", "meterproxy_max_body=4000"))
    yield gateway
    gateway.stop()


def client_for(gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0)


def test_a_connection_over_its_requests_per_minute_gets_429(gateway, fake):
    account = make_account(gateway.store, limits=ProductLimits(requests_per_minute=2))
    client = client_for(gateway, account.token())
    served = [
        client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES) for _ in range(2)
    ]
    assert served[1].headers["x-ratelimit-remaining-requests"] == "0"
    rows, audit = len(gateway.rows()), len(gateway.audit())
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    headers = raised.value.response.headers
    assert raised.value.code == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "0")
    assert len(fake.requests()) == 2
    gateway.row(served[1].headers["x-lava-request-id"])
    assert len(gateway.rows()) == rows
    assert [entry["code"] for entry in gateway.audit_since(audit)] == ["rate_limit_exceeded"]


def test_a_body_over_the_limit_gets_413(gateway, fake):
    account = make_account(gateway.store)
    client = client_for(gateway, account.token())
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 5000}])
    assert (raised.value.status_code, raised.value.code) == (413, "request_too_large")
    chunked = httpx2.post(
        f"{gateway.url}/openai/v1/chat/completions",
        content=iter([json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "pad": "y" * 5000}).encode()]),
        headers={"authorization": f"Bearer {account.token()}", "content-type": "application/json"},
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert fake.requests() == []
