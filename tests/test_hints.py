"""Errors that say what to do, as a newcomer meets them through the OpenAI SDK and the real
gateway: each names the fix, nothing is forwarded, and the refusal is audited."""

import httpx2
import openai
import pytest

from tests.harness import make_account

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def token(gateway):
    return make_account(gateway.store).token()


def refused(gateway, fake, base_url: str, api_key: str, expected: type) -> openai.APIStatusError:
    audit_before = len(gateway.audit())
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    with pytest.raises(expected) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert fake.requests() == []
    [entry] = gateway.audit_since(audit_before)
    assert entry["code"] == raised.value.code
    assert api_key not in raised.value.message
    return raised.value


def test_a_plain_http_u_is_told_to_use_https(gateway, fake, token):
    plain = f"{gateway.url}/v1/forward?u=http://api.openai.com/v1/"
    error = refused(gateway, fake, plain, token, openai.PermissionDeniedError)
    https = "https://api.openai.com/v1/chat/completions"
    assert error.body["message"] == f"api.openai.com is called over https only: use {https}"


@pytest.mark.parametrize("key", ["sk-proj-N0tAT0kenButAKey", "AIzaSyN0tAT0kenButAKey"])
def test_a_provider_key_where_the_forward_token_belongs_is_told_to_mint_one(gateway, fake, key):
    error = refused(gateway, fake, f"{gateway.url}/openai/v1", key, openai.AuthenticationError)
    assert error.body["message"].startswith("this looks like a provider key, not a forward token: mint a forward token")
    assert "meterproxy token mint" in error.body["message"]


def test_a_path_without_a_provider_is_told_the_two_base_urls(gateway, fake, token):
    error = refused(gateway, fake, f"{gateway.url}/v1", token, openai.NotFoundError)
    assert error.body["message"] == (
        f"no such endpoint: /v1/chat/completions. The path names no provider: use the base URL {gateway.url}/openai/v1"
        f" or {gateway.url}/v1/forward?u=https://api.openai.com/v1/"
    )
    # What the message says works.
    for base_url in (f"{gateway.url}/openai/v1", f"{gateway.url}/v1/forward?u=https://api.openai.com/v1/"):
        client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
        assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message.content


@pytest.mark.parametrize(
    "path",
    ["/openai/v1chat/completions", "/v1/forward?u=https://api.openai.com/v1chat/completions"],
    ids=["provider route", "forward u"],
)
def test_a_path_that_lost_its_slash_is_told_the_base_url(gateway, fake, token, path):
    """An SDK that joins its path to a base URL without a trailing slash, adding none."""
    answer = httpx2.post(f"{gateway.url}{path}", headers={"authorization": f"Bearer {token}"}, json={})
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "message": "the path /v1chat/completions lost the slash after /v1: use the base URL /openai/v1/ on the"
        " gateway, or u=https://api.openai.com/v1/",
        "type": "invalid_request_error",
        "param": None,
        "code": "malformed_target",
    }
    assert fake.requests() == []
