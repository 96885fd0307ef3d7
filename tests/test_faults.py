"""Provider faults against the fake provider's fault injection (SPEC §3, §7): for each, what
the client got, how many attempts reached the provider, and the call's single ledger row."""

import hashlib
import inspect
import socket
import time

import httpx2
import openai
import pytest

from tests.harness import Gateway, make_account, stream_until_cut, wait_until

FIRST_KEY, SECOND_KEY = "sk-managed-first-1a2b", "sk-managed-second-3c4d"
MESSAGES = [{"role": "user", "content": "are you there"}]
# sha256 of inspect.getsource(HttpStream.handle_protocol_error), the method addons/failures.py wraps
MITMPROXY_12_3_1_HANDLE_PROTOCOL_ERROR = "59fc3b2eeeabf63a64d4cce98b4fe4cab5193ebefbd9c32ae186e65c7d25bfe2"
OPTIONS = {
    "meterproxy_attempts": 3,
    "meterproxy_first_byte_timeout": 1,
    "meterproxy_idle_timeout": 1,
    "meterproxy_max_retry_wait": 5,
    "meterproxy_connect_timeout": 1,
}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(fake, tmp_path_factory):
    args = tuple(arg for name, value in OPTIONS.items() for arg in ("--set", f"{name}={value}"))
    down = f'[providers.down]\nbase_url = "https://down.provider.test"\nupstream = "http://127.0.0.1:{closed_port()}"\n'
    gateway = Gateway(
        tmp_path_factory.mktemp("faults"),
        fake,
        args=args,
        env={
            "OPENAI_API_KEY": f"{FIRST_KEY},{SECOND_KEY}",
            "DOWN_API_KEY": "sk-down-managed-5a0c",
            # A proxy in the gateway's environment that is not there: retries go straight to the provider.
            "HTTP_PROXY": f"http://127.0.0.1:{closed_port()}",
            "ALL_PROXY": f"http://127.0.0.1:{closed_port()}",
        },
        more_providers=down + 'price_provider = "openai"\n',
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def account(gateway):
    return make_account(gateway.store)


def chat(gateway, account, route="openai/v1", **options):
    client = openai.OpenAI(base_url=f"{gateway.url}/{route}", api_key=account.token(), max_retries=0)
    return client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, **options)


def keys_seen(fake) -> list[str]:
    return [dict(request["headers"])["authorization"].removeprefix("Bearer ") for request in fake.requests()]


def test_429_with_retry_after_then_success_fails_over_to_the_next_key(gateway, fake, account):
    fake.behave({"status": 429, "headers": {"retry-after": "1"}})
    started = time.monotonic()
    raw = chat(gateway, account)
    assert raw.status_code == 200 and raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    assert time.monotonic() - started >= 1  # Retry-After honoured
    first, second = keys_seen(fake)
    assert {first, second} == {FIRST_KEY, SECOND_KEY}  # the retry went out with the other key
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["upstream_status"], row["output_tokens"]) == ("completed", 2, 200, 5)


def test_500_twice_then_success(gateway, fake, account):
    fake.behave({"status": 500}, {"status": 500})
    raw = chat(gateway, account)
    assert raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    assert len(fake.requests()) == 3
    gateway.row(raw.headers["x-lava-request-id"])  # once completed
    rows = [row for row in gateway.rows() if row["request_id"] == raw.headers["x-lava-request-id"]]
    assert [(row["status"], row["attempts"]) for row in rows] == [("completed", 3)]  # one row, three attempts


def test_500_until_the_attempts_run_out_passes_the_last_answer_on(gateway, fake, account):
    fake.behave({"status": 503}, {"status": 503}, {"status": 503})
    with pytest.raises(openai.InternalServerError) as raised:
        chat(gateway, account)
    assert raised.value.status_code == 503
    assert len(fake.requests()) == 3
    row = gateway.row(raised.value.response.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["upstream_status"], row["wallet_cost"]) == (
        "error",
        3,
        503,
        "0.0000000000",
    )


def test_a_streamed_429_is_passed_on_untouched_with_its_retry_after(gateway, fake, account):
    fake.behave({"status": 429, "headers": {"retry-after": "2"}})
    with pytest.raises(openai.RateLimitError) as raised:
        chat(gateway, account, stream=True)
    assert raised.value.response.headers["retry-after"] == "2"
    assert len(fake.requests()) == 1
    row = gateway.row(raised.value.response.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["upstream_status"]) == ("error", 1, 429)


def gateway_error(gateway, fake, account, stream: bool) -> tuple[openai.APIStatusError, dict]:
    """A call that fails upstream: what the client got (raised by the SDK) and its row."""
    with pytest.raises(openai.APIStatusError) as raised:
        if stream:
            chat(gateway, account, stream=True).parse().close()
        else:
            chat(gateway, account)
    response = raised.value.response
    assert response.headers["content-type"] == "application/json"
    return raised.value, gateway.row(response.headers["x-lava-request-id"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_provider_that_hangs_past_the_first_byte_timeout_is_a_504_in_the_openai_shape(gateway, fake, account, stream):
    fake.behave(*[{"hang": 10}] * OPTIONS["meterproxy_attempts"])
    error, row = gateway_error(gateway, fake, account, stream)
    assert (error.status_code, error.code, error.type) == (504, "upstream_timeout", "upstream_timeout")
    assert error.body["message"] == "the provider sent nothing for 1 s"
    attempts = 1 if stream else OPTIONS["meterproxy_attempts"]  # a stream is never retried
    assert len(fake.requests()) == attempts
    assert (row["status"], row["attempts"], row["upstream_status"], row["error_message"], row["wallet_cost"]) == (
        "error",
        attempts,
        None,
        "the provider sent nothing for 1 s",
        "0.0000000000",
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_provider_that_drops_the_connection_before_answering_is_a_502_in_the_openai_shape(
    gateway, fake, account, stream
):
    fake.behave(*[{"hang": 0}] * OPTIONS["meterproxy_attempts"])  # closes the connection at once
    error, row = gateway_error(gateway, fake, account, stream)
    assert (error.status_code, error.code, error.type) == (502, "upstream_error", "upstream_error")
    assert error.body["message"].startswith("the provider failed before answering: ")
    attempts = 1 if stream else OPTIONS["meterproxy_attempts"]
    assert len(fake.requests()) == attempts
    assert (row["status"], row["attempts"], row["upstream_status"]) == ("error", attempts, None)
    assert row["error_message"] == error.body["message"]


def test_a_call_that_timed_out_once_is_retried_and_answered(gateway, fake, account):
    fake.behave({"hang": 10})
    raw = chat(gateway, account)
    assert raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    assert len(fake.requests()) == 2
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["upstream_status"], row["output_tokens"]) == ("completed", 2, 200, 5)


def test_the_wrapped_mitmproxy_method_is_the_one_reviewed():
    """addons/failures.py wraps `HttpStream.handle_protocol_error`: when mitmproxy changes that
    method, this fails, and the wrapper must be reviewed against the new one (then update the digest)."""
    from addons.failures import ORIGINAL

    assert hashlib.sha256(inspect.getsource(ORIGINAL).encode()).hexdigest() == MITMPROXY_12_3_1_HANDLE_PROTOCOL_ERROR


def test_a_stream_cut_halfway_is_charged_for_what_was_delivered(gateway, fake, account):
    fake.behave({"cut_after": 4, "words": 8})
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)
    request_id, delivered = stream_until_cut(client, MESSAGES)
    assert delivered == "w0 w1 w2"
    row = gateway.row(request_id)
    assert (row["status"], row["usage_source"], row["attempts"]) == ("completed", "estimated", 1)
    assert row["output_tokens"] > 0


@pytest.mark.parametrize("delay, complete", [(0.3, True), (2.0, False)], ids=["within-idle-timeout", "stalled"])
def test_a_slow_drip(gateway, fake, account, delay, complete):
    fake.behave({"chunk_delay": delay, "words": 4})
    client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)
    texts = []
    try:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ) as response:
            request_id = response.headers["x-lava-request-id"]
            for chunk in response.parse():
                texts.append(chunk.choices[0].delta.content if chunk.choices else None)
        finished = True
    except openai.APIConnectionError:
        finished = False
    assert finished is complete
    row = gateway.row(request_id)
    if complete:
        # Chunk by chunk, as they came: tests/test_forward_openai.py shows it by the order of events.
        assert [text for text in texts if text] == ["w0", " w1", " w2", " w3"]
        assert (row["status"], row["usage_source"], row["output_tokens"]) == ("completed", "provider", 4)
    else:
        assert (row["status"], row["usage_source"]) == ("completed", "estimated")


def test_an_unreachable_provider_is_a_502_in_the_openai_shape_after_the_retries(gateway, fake, account):
    with pytest.raises(openai.InternalServerError) as raised:
        chat(gateway, account, route="down/v1")
    error = raised.value
    assert (error.status_code, error.code) == (502, "upstream_unreachable")
    assert error.body["message"] == "provider unreachable after 3 attempts"
    row = gateway.row(error.response.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["upstream_status"], row["wallet_cost"]) == (
        "error",
        3,
        None,
        "0.0000000000",
    )
    assert gateway.store.wallet(account.wallet_id)["held"] == "0.0000000000"


def test_a_client_gone_mid_stream_closes_the_provider_before_the_stream_ends(gateway, fake, account):
    fake.behave({"chunk_delay": 0.1, "words": 600})  # a minute of stream: the client leaves long before
    url = f"{gateway.url}/openai/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with httpx2.stream("POST", url, json=body, headers={"authorization": f"Bearer {account.token()}"}) as response:
        request_id = response.headers["x-lava-request-id"]
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # three events with their blank lines
    assert received[0].startswith("data: ")
    [seen] = wait_until(lambda: [entry for entry in fake.requests() if "aborted_at" in entry], "the provider's abort")
    assert seen["events_sent"] < 600  # the order of events: aborted long before the stream's end
    row = gateway.row(request_id)
    assert (row["status"], row["usage_source"]) == ("completed", "estimated")
    assert 2 <= row["output_tokens"] <= seen["events_sent"] * 2


def test_a_provider_redirect_is_never_handed_on(gateway, fake, account):
    fake.behave({"status": 302, "headers": {"location": "https://evil.example/collect"}, "body": {}})
    with pytest.raises(openai.InternalServerError) as raised:
        chat(gateway, account)
    response = raised.value.response
    assert (response.status_code, raised.value.code) == (502, "upstream_redirect")
    assert "location" not in response.headers and "evil.example" not in response.text
    assert len(fake.requests()) == 1
    row = gateway.row(response.headers["x-lava-request-id"])
    assert (row["status"], row["wallet_cost"]) == ("error", "0.0000000000")


def test_a_redirect_that_comes_on_a_retry_is_never_handed_on(gateway, fake, account):
    fake.behave({"status": 503}, {"status": 307, "headers": {"location": "https://evil.example/collect"}, "body": {}})
    with pytest.raises(openai.InternalServerError) as raised:
        chat(gateway, account)
    response = raised.value.response
    assert (response.status_code, raised.value.code) == (502, "upstream_redirect")
    assert "location" not in response.headers and len(fake.requests()) == 2
    row = gateway.row(response.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["wallet_cost"]) == ("error", 2, "0.0000000000")


def test_an_error_page_that_is_not_json_is_retried_before_anything_reaches_the_client(gateway, fake, account):
    fake.behave({"status": 503, "headers": {"content-type": "text/html"}, "body": "<html>overloaded</html>"})
    raw = chat(gateway, account)
    assert raw.status_code == 200 and raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["upstream_status"], row["output_tokens"]) == ("completed", 2, 200, 5)


@pytest.mark.parametrize("content_type", ["text/plain", "text/html", "application/json"])
def test_a_provider_error_that_quotes_the_key_reaches_the_client_without_it(gateway, fake, account, content_type):
    own_key = "sk-own-key-quoted-back-9d1e"
    quoted = f"Incorrect API key provided: {own_key}"
    fake.behave({"status": 401, "headers": {"content-type": content_type, "x-echo": quoted}, "body": quoted})
    response = httpx2.post(
        f"{gateway.url}/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {account.token(provider_key=own_key)}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
    )
    assert dict(fake.requests()[0]["headers"])["authorization"] == f"Bearer {own_key}"
    assert response.status_code == 401 and "Incorrect API key provided" in response.text
    assert own_key not in response.text + str(response.headers)
    assert response.headers["x-echo"] == "Incorrect API key provided: <redacted by meterproxy>"
    row = gateway.row(response.headers["x-lava-request-id"])
    assert (row["status"], row["upstream_status"]) == ("error", 401)


@pytest.mark.parametrize(
    "stall, status, code, error",
    [
        (0, 502, "upstream_error", "the answer was cut short: "),
        (5, 504, "upstream_timeout", "the provider did not finish its answer within 1 s"),
    ],
)
def test_an_answer_cut_short_after_its_headers_is_an_error_that_charges_nothing(
    gateway, fake, account, stall, status, code, error
):
    fake.behave({"body_cut": 40, "body_stall": stall})
    balance = gateway.store.wallet_balance(account.wallet_id)
    raised, row = gateway_error(gateway, fake, account, stream=False)
    assert (raised.status_code, raised.code) == (status, code)  # nothing of the answer reached the client
    assert len(fake.requests()) == 1  # the provider answered (and may bill it): not tried again
    assert (row["status"], row["upstream_status"], row["wallet_cost"]) == ("error", 200, "0.0000000000")
    assert row["error_message"].startswith(error) and raised.body["message"] == row["error_message"]
    assert gateway.store.wallet_balance(account.wallet_id) == balance


def test_a_retried_answer_that_came_compressed_reaches_the_client_readable(gateway, fake, account):
    fake.behave({"status": 500}, {"gzip": True})
    raw = chat(gateway, account)
    assert raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["attempts"], row["output_tokens"]) == ("completed", 2, 5)


def test_a_client_that_leaves_while_an_answer_comes_is_charged_for_it(gateway, fake, account):
    fake.behave({"body_cut": 40, "body_stall": 5})
    before = {r["request_id"] for r in gateway.rows()}
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"are you there"}]}'
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {account.token()}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        [request_id] = wait_until(lambda: {r["request_id"] for r in gateway.rows()} - before, "the pending row")
        # The gateway has the provider's headers (the recorder writes them down): the client goes
        # before the rest.
        wait_until(lambda: request_id.encode() in gateway.recorded(), "the answer's headers")
    row = gateway.row(request_id)
    assert (row["status"], row["usage_source"], row["upstream_status"]) == ("completed", "estimated", 200)
    assert row["wallet_cost"] != "0.0000000000"


def test_a_retried_answer_that_quotes_the_key_reaches_the_client_without_it(gateway, fake, account):
    own_key = "sk-own-key-quoted-on-retry-4c2f"
    quoted = f"Incorrect API key provided: {own_key}"
    fake.behave(
        {"status": 503}, {"status": 401, "headers": {"content-type": "text/plain", "x-echo": quoted}, "body": quoted}
    )
    response = httpx2.post(
        f"{gateway.url}/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {account.token(provider_key=own_key)}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
    )
    assert (response.status_code, len(fake.requests())) == (401, 2)
    assert own_key not in response.text + str(response.headers)
