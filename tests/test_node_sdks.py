"""The official Node SDKs (openai, @anthropic-ai/sdk, from tests/node/package.json) through the
real gateway: the Lava-style forward base URL, the path-before-query form that SDKs built on the
WHATWG URL rules send (`/v1/forward/<path>?u=<base>`), and the provider routes; streamed and not.
`scripts/test` installs the SDKs into tests/node/node_modules."""

import json
import shutil
import subprocess

import pytest

from tests.harness import MANAGED_KEYS, ROOT, make_account

NODE = ROOT / "tests" / "node"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE / "node_modules" / "openai").is_dir(),
    reason="Node.js or the Node SDKs are missing (scripts/test installs them with npm when npm is there)",
)
SDKS = {
    "openai": ("gpt-4o-mini", "https://api.openai.com/v1/", "/openai", "/v1/chat/completions", "authorization"),
    "anthropic": ("claude-sonnet-5", "https://api.anthropic.com", "/anthropic", "/v1/messages", "x-api-key"),
}


@pytest.fixture(scope="module")
def account(gateway):
    return make_account(gateway.store)


def node_call(sdk: str, **options) -> dict:
    model = SDKS[sdk][0]
    described = json.dumps({"sdk": sdk, "model": model, **options})
    done = subprocess.run(
        ["node", str(NODE / "sdk_call.mjs"), described], capture_output=True, text=True, timeout=120, cwd=NODE
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def base_urls(gateway, sdk: str) -> dict[str, dict]:
    """How a Node app names the gateway: the three forms."""
    _, provider_base, route, _, _ = SDKS[sdk]
    return {
        "lava forward": {"baseURL": f"{gateway.url}/v1/forward?u={provider_base}"},
        # What a WHATWG-style join sends: POST /v1/forward/<path>?u=<encoded base>
        "path before query": {"baseURL": f"{gateway.url}/v1/forward", "defaultQuery": {"u": provider_base}},
        "provider route": {"baseURL": f"{gateway.url}{route}" + ("/v1" if sdk == "openai" else "")},
    }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("form", ["lava forward", "path before query", "provider route"])
@pytest.mark.parametrize("sdk", list(SDKS))
def test_a_node_sdk_call_is_forwarded_metered_and_charged(gateway, fake, account, sdk, form, stream):
    model, _, route, upstream_path, key_header = SDKS[sdk]
    got = node_call(sdk, apiKey=account.token(), stream=stream, **base_urls(gateway, sdk)[form])
    assert got.get("text") == "w0 w1 w2 w3 w4", got
    [seen] = fake.requests()
    assert (seen["method"], seen["path"]) == ("POST", f"/{sdk}{upstream_path}")
    headers = dict(seen["headers"])
    sent_key = MANAGED_KEYS[f"{sdk.upper()}_API_KEY"]
    assert headers[key_header] == (f"Bearer {sent_key}" if key_header == "authorization" else sent_key)
    assert seen["query"] in ("", None)  # the `u` parameter is the gateway's, never the provider's
    row = gateway.row(got["requestId"])
    assert (row["status"], row["provider"], row["model"], row["stream"]) == ("completed", sdk, model, int(stream))
    assert row["endpoint"] == f"POST {SDKS[sdk][1].rstrip('/').removesuffix('/v1')}{upstream_path}"
    assert (row["output_tokens"], row["usage_source"]) == (5, "provider")
    assert row["wallet_cost"] != "0.0000000000"


@pytest.mark.parametrize("target", ["https://evil.example/v1/", "http://api.openai.com/v1/"])
def test_the_path_form_checks_its_target_as_any_u(gateway, fake, account, target):
    forward = {"baseURL": f"{gateway.url}/v1/forward", "defaultQuery": {"u": target}}
    got = node_call("openai", apiKey=account.token(), stream=False, **forward)
    assert (got["status"], got["code"]) == (403, "provider_not_allowed")
    assert fake.requests() == []
