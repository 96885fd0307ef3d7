"""No key, secret or forward token is ever written to the ledger, a log line or a response
(SPEC §2). Runs last (by name): it searches everything every gateway of the session left
behind — database files, log output, every response sent to a client (recorded by
tests/leak_recorder.py) — for every secret the session's tests used, after putting one more
gateway through traffic of every kind."""

import httpx2
import openai
import pytest

from tests.harness import GATEWAYS, MANAGED_KEYS, SECRETS, Gateway, make_account, secret


@pytest.fixture(scope="module")
def busy_gateway(fake, tmp_path_factory):
    """Calls of every kind: modes, streams, providers' routes, refusals, the metering API."""
    gateway = Gateway(tmp_path_factory.mktemp("leaks"), fake, args=("--set", "flow_detail=3"))
    account = make_account(gateway.store)
    messages = [{"role": "user", "content": "keep my secrets"}]
    tokens = [
        account.token(),
        account.token(provider_key="sk-byok-leak-check-31"),
        account.token(provider_key="sk-meter-leak-52", billed=False),
    ]
    for token in tokens:
        client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    google = f"{gateway.url}/google/v1beta/models/gemini-2.5-flash:generateContent"
    httpx2.post(f"{google}?key={tokens[0]}", json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    for bad in (secret("sk-not-a-token-7781"), tokens[0][:-4]):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=bad, max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=messages
            )
    fake.behave(
        {"status": 401, "body": {"error": {"message": f"Incorrect API key provided: {MANAGED_KEYS['OPENAI_API_KEY']}"}}}
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=tokens[0], max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=messages
        )
    # Refused before the token could be taken off: a bad metadata header, the token in a raw `u`'s
    # own query; a base URL with a typo, the token in its header.
    gemini = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    refused = httpx2.post(
        f"{gateway.url}/v1/forward?u={gemini}?key={tokens[0]}", headers={"x-lava-metadata": "[]"}, json={}
    )
    typo = httpx2.post(f"{gateway.url}/opanai/v1/chat/completions", headers={"authorization": f"Bearer {tokens[0]}"})
    assert (refused.status_code, typo.status_code, typo.json()["error"]["code"]) == (400, 404, "unknown_endpoint")
    upstream = str(fake.requests())
    httpx2.post(
        f"{gateway.url}/v1/requests",
        headers={"authorization": f"Bearer {account.secret_key}"},
        json={
            "connection_secret": account.connection_secret,
            "product_secret": account.product_secret,
            "model": "gpt-4o-mini",
            "provider": "openai",
            "input_tokens": 3,
        },
    )
    yield gateway, upstream
    gateway.stop()


def test_the_search_would_find_a_leak(busy_gateway):
    """The positive control: the keys did travel (to the provider), and the traces hold the
    responses, the ledger and the log."""
    gateway, upstream = busy_gateway
    assert MANAGED_KEYS["OPENAI_API_KEY"] in upstream and "sk-byok-leak-check-31" in upstream
    traces = gateway.traces()
    assert b"chat.completion.chunk" in traces  # responses, streams included
    assert b"x-lava-request-id" in traces and b"gpt-4o-mini" in traces
    assert b"Incorrect API key provided" in traces  # the provider's error, with the key scrubbed
    assert len(SECRETS) > 10 and gateway in GATEWAYS


def test_no_secret_of_the_session_is_in_anything_a_gateway_left_behind(busy_gateway):
    """Every gateway of the session, every secret of the session."""
    leaks = {
        (str(gateway.db_path.parent), value)
        for gateway in GATEWAYS
        for value in SECRETS
        if value.encode() in gateway.traces()
    }
    assert leaks == set()
