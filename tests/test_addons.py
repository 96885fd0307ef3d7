"""The mitmproxy addons, tested the way mitmproxy tests its own: taddons contexts and tflow flows."""

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

import meterproxy.writer
from addons.api import MeteringApi
from addons.auth import REDACTED, Auth, ManagedKeys
from addons.calls import CALL, call_of
from addons.ledger import Ledger
from addons.metering import Metering
from addons.pipeline import Pipeline
from addons.resilience import Retries, UpstreamWatch
from addons.routing import REQUEST_ID_HEADER, Routing, retarget
from meterproxy.call import Call
from meterproxy.dialects import OpenAIChat
from meterproxy.leases import DEFAULT_LEASE, new_gateway
from meterproxy.providers import Registry
from meterproxy.store import Store
from meterproxy.stream import StreamMeter
from meterproxy.token import encode_token
from meterproxy.writer import LedgerWriter
from pricing.fees import ProductFees

ROOT = Path(__file__).resolve().parents[1]
CHAT = "https://api.openai.com/v1/chat/completions"
TOKEN = encode_token(secret_key="msk_addon_secret", provider_key="sk-addon-byok")


def gateway_flow(path: str, headers: dict | None = None, body: object = None, method: str = "POST") -> http.HTTPFlow:
    """A request addressed to the gateway itself (not through a CONNECT tunnel)."""
    flow = tflow.tflow()
    flow.server_conn.address = None
    flow.request.method = method
    flow.request.host, flow.request.port = "127.0.0.1", 8080
    flow.request.path = path
    flow.request.headers = http.Headers(host="127.0.0.1:8080")
    for name, value in (headers or {}).items():
        flow.request.headers[name] = value
    flow.request.content = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    return flow


def error_of(flow: http.HTTPFlow) -> tuple[int, dict]:
    assert flow.response.headers["content-type"] == "application/json"
    return flow.response.status_code, json.loads(flow.response.content)["error"]


def routed(
    path: str, headers: dict | None = None, body: object = None, routing: Routing | None = None
) -> http.HTTPFlow:
    routing = routing or Routing()
    with taddons.context(routing):
        flow = gateway_flow(path, headers, body)
        routing.requestheaders(flow)
    return flow


# --- Routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "upstream",
    [
        "https://api.openai.com/v1/chat/completions",
        "http://127.0.0.1:8123/openai/v1/chat/completions?x=%C3%A9",
        "https://generativelanguage.googleapis.com:443/v1beta/models/g:streamGenerateContent?alt=sse",
    ],
)
@pytest.mark.parametrize("http2", [False, True])
def test_retarget_does_what_setting_the_url_does(upstream, http2):
    def request() -> http.Request:
        flow = gateway_flow("/openai/v1/chat/completions")
        if http2:
            flow.request.http_version, flow.request.authority = "HTTP/2.0", "127.0.0.1:8080"
        return flow.request

    expected, got = request(), request()
    expected.url = upstream
    retarget(got, upstream)
    assert got.data == expected.data
    assert (got.url, got.host_header) == (expected.url, upstream.split("/")[2].removesuffix(":443"))


@pytest.mark.parametrize(
    "path, url",
    [
        (f"/v1/forward?u={CHAT}", CHAT),
        (f"/v1/forward/?u={CHAT}", CHAT),
        ("/v1/forward?u=https%3A%2F%2Fapi.openai.com%2Fv1%2Fchat%2Fcompletions", CHAT),
        (f"/v1/forward?metadata=%7B%22a%22%3A%22b%22%7D&u={CHAT}", CHAT),
        ("/openai/v1/chat/completions", CHAT),
        (
            "/v1/forward?u=https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse",
            "https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse",
        ),
        (
            "/google/v1beta/models/g:streamGenerateContent?alt=sse",
            "https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse",
        ),
        ("/anthropic/v1/messages", "https://api.anthropic.com/v1/messages"),
    ],
)
def test_routing_rewrites_the_request_to_the_provider(path, url):
    flow = routed(path)
    call = call_of(flow)
    assert flow.response is None
    assert flow.request.url == url
    assert flow.request.headers["host"] == url.split("/")[2]
    assert call.target.url == url
    assert call.request_id.startswith("req_") and len(call.request_id) == 30
    assert call.endpoint == f"POST {url.partition('?')[0]}"


def test_routing_sends_to_the_configured_upstream(tmp_path):
    providers = tmp_path / "providers.toml"
    providers.write_text('[providers.openai]\nupstream = "http://127.0.0.1:9911/openai"\n')
    routing = Routing()
    with taddons.context(routing) as tctx:
        tctx.configure(routing, meterproxy_providers=str(providers))
        flow = gateway_flow(f"/v1/forward?u={CHAT}?stream=1")
        routing.requestheaders(flow)
    assert flow.request.url == "http://127.0.0.1:9911/openai/v1/chat/completions?stream=1"
    assert call_of(flow).target.url == CHAT + "?stream=1"


def test_an_invalid_providers_file_is_an_options_error_once_running(tmp_path):
    providers = tmp_path / "providers.toml"
    providers.write_text("[providers.openai]\nbogus = 1\n")
    routing = Routing()
    with taddons.context(routing) as tctx:
        routing.running()
        with pytest.raises(exceptions.OptionsError, match="bogus"):
            tctx.configure(routing, meterproxy_providers=str(providers))
    assert "openai" in routing.registry.by_name  # the running providers stay


def test_an_invalid_providers_file_at_start_is_one_error_line_and_no_provider(tmp_path, caplog):
    """mitmproxy stops on an error logged during start-up; an OptionsError would be logged with
    its traceback."""
    providers = tmp_path / "providers.toml"
    providers.write_text("[providers.openai]\nbogus = 1\n")
    routing = Routing()
    with taddons.context(routing) as tctx:
        tctx.configure(routing, meterproxy_providers=str(providers))
    [record] = [record for record in caplog.records if record.name == "meterproxy"]
    assert (record.levelname, record.getMessage()) == (
        "ERROR",
        f"providers file {providers}: providers.openai.bogus: Extra inputs are not permitted",
    )
    assert routing.registry.by_name == {}  # nothing is served meanwhile


@pytest.mark.parametrize(
    "path, status, code, message",
    [
        (
            "/v1/forward?u=https://evil.example/v1/chat/completions",
            403,
            "provider_not_allowed",
            "evil.example is not a registered provider",
        ),
        (
            "/v1/forward?u=https://api.openai.com.evil.example/v1",
            403,
            "provider_not_allowed",
            "api.openai.com.evil.example is not a registered provider",
        ),
        (
            "/v1/forward?u=https://api.openai.com@evil.example/v1",
            403,
            "provider_not_allowed",
            "evil.example is not a registered provider",
        ),
        (
            "/v1/forward?u=http://api.openai.com/v1",
            403,
            "provider_not_allowed",
            "api.openai.com is called over https only: use https://api.openai.com/v1",
        ),
        (
            "/v1/forward?u=https://api.openai.com/v1chat/completions",
            400,
            "malformed_target",
            "the path /v1chat/completions lost the slash after /v1: use the base URL /openai/v1/ on the gateway,"
            " or u=https://api.openai.com/v1/",
        ),
        ("/v1/forward", 400, "missing_target", "missing target URL: pass ?u=<provider URL>"),
        (
            "/v1/forward?u=https://api.openai.com/v1/../x",
            400,
            "malformed_target",
            "target URL has a fragment or dot segments",
        ),
        ("/openai/v1/%2e%2e/admin", 400, "malformed_target", "target URL has a fragment or dot segments"),
    ],
)
def test_routing_refuses_bad_targets_in_the_openai_error_shape(path, status, code, message):
    flow = routed(path, {"x-lava-metadata-user_id": "u_42"})
    assert error_of(flow) == (
        status,
        {
            "message": message,
            "type": {400: "invalid_request_error", 403: "permission_error"}[status],
            "param": None,
            "code": code,
        },
    )
    assert call_of(flow).refusal.status == status
    assert flow.request.host == "127.0.0.1"  # not rewritten: nothing goes anywhere


def test_a_refused_target_is_kept_for_the_audit_without_userinfo():
    flow = routed("/v1/forward?u=https://alice:hunter2@evil.example/x")
    assert call_of(flow).target_host == "evil.example"


@pytest.mark.parametrize(
    "path",
    [f"/v1/forward?u={CHAT}", "/openai/v1/chat/completions", "/v1/forward?u=https://evil.example/"],
)
def test_a_flow_through_a_tunnel_or_transparent_proxy_is_left_untouched(path):
    routing = Routing()
    with taddons.context(routing):
        flow = tflow.tflow()  # server_conn.address is set: the client named its own server
        flow.request.path = path
        flow.request.headers["x-lava-metadata-user_id"] = "u_42"
        url = flow.request.url
        routing.requestheaders(flow)
    assert call_of(flow) is None
    assert flow.response is None
    assert flow.request.url == url
    assert flow.request.headers["x-lava-metadata-user_id"] == "u_42"


@pytest.mark.parametrize("path", ["/", "/v1/models", "/health", "/opanai/v1/chat/completions"])
def test_other_gateway_paths_are_a_404_that_keeps_no_credential(path):
    flow = routed(path, {"authorization": "Bearer a-forward-token"})
    status, error = error_of(flow)
    assert (status, error["code"]) == (404, "unknown_endpoint")
    assert error["message"].startswith(f"no such endpoint: {path}")
    assert "authorization" not in flow.request.headers and call_of(flow).refusal is not None


def test_a_websocket_to_a_provider_is_refused_before_any_key_goes_on():
    headers = {"upgrade": "websocket", "connection": "Upgrade", "authorization": "Bearer a-forward-token"}
    flow = routed("/openai/v1/realtime?model=gpt-realtime", headers)
    status, error = error_of(flow)
    assert (status, error["code"]) == (400, "upgrade_not_supported")
    assert "authorization" not in flow.request.headers


@pytest.mark.parametrize("path", ["/v1/requests", "/v1/requests/req_1", "/v1/usage"])
def test_the_metering_apis_paths_are_left_to_it(path):
    flow = routed(path)
    assert call_of(flow) is None and flow.response is None


def test_metadata_is_read_and_its_headers_are_stripped():
    flow = routed(
        "/v1/forward?u=" + CHAT,
        {
            "X-Lava-Metadata": '{"plan": "pro", "user_id": "from-json"}',
            "x-lava-metadata-user_id": "u_42",
            "authorization": "Bearer " + TOKEN,
            "content-type": "application/json",
        },
    )
    assert call_of(flow).metadata == {"plan": "pro", "user_id": "u_42"}
    assert [name.lower() for name in flow.request.headers] == [
        "host",
        "authorization",
        "content-type",
        "content-length",
    ]


def test_bad_metadata_is_a_400():
    flow = routed("/v1/forward?u=" + CHAT, {"x-lava-metadata-user-id": "u_42"})
    status, error = error_of(flow)
    assert (status, error["code"]) == (400, "invalid_metadata")


def test_responseheaders_adds_the_request_id():
    routing = Routing()
    flow = routed("/openai/v1/chat/completions", routing=routing)
    flow.response = http.Response.make(200, b"{}")
    routing.responseheaders(flow)
    assert flow.response.headers[REQUEST_ID_HEADER] == call_of(flow).request_id


def test_a_refusal_also_carries_the_request_id():
    routing = Routing()
    flow = routed("/v1/forward?u=https://evil.example/", routing=routing)
    routing.responseheaders(flow)
    assert flow.response.headers[REQUEST_ID_HEADER] == call_of(flow).request_id


def test_a_flow_that_is_not_a_call_gets_no_request_id():
    routing = Routing()
    flow = tflow.tflow(resp=True)
    routing.responseheaders(flow)
    assert REQUEST_ID_HEADER not in flow.response.headers


# --- Auth ---------------------------------------------------------------------------------------


def authenticated(headers: dict, path: str = "/v1/forward?u=" + CHAT) -> http.HTTPFlow:
    flow = routed(path, headers)
    auth = Auth()
    with taddons.context(auth):
        auth.requestheaders(flow)
    return flow


def test_auth_takes_the_token_off_the_request():
    flow = authenticated({"authorization": f"Bearer {TOKEN}", "x-api-key": "k", "x-goog-api-key": "g", "accept": "*/*"})
    call = call_of(flow)
    assert flow.response is None
    assert (call.token.secret_key, call.token.provider_key) == ("msk_addon_secret", "sk-addon-byok")
    assert [name.lower() for name in flow.request.headers] == ["host", "accept", "content-length"]


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "no forward token"),
        ({"authorization": "Bearer "}, "no forward token"),
        ({"authorization": f"Basic {TOKEN}"}, "no forward token"),
        ({"authorization": "Bearer not-base64! msk_addon_secret"}, "forward token is not base64-encoded JSON"),
        (
            {"authorization": "Bearer msk_addon_secret"},
            "this is one of the gateway's secrets, not a forward token: mint a forward token from them"
            " (meterproxy token mint --secret-key msk_… …)",
        ),
        (
            {"x-api-key": "sk-ant-api03-msk_addon_secret"},
            "this looks like a provider key, not a forward token: mint a forward token (meterproxy token mint"
            " --secret-key msk_… --connection-secret csk_… --product-secret psk_…, or with --provider-key to use"
            " your own key) and send that",
        ),
        (
            {"authorization": "Bearer " + encode_token(secret_key="msk_addon_secret")},
            "invalid forward token: Value error, a token without connection and product needs a provider_key",
        ),
    ],
)
def test_auth_refuses_a_missing_or_undecodable_token_with_401(headers, message):
    flow = authenticated(headers)
    assert error_of(flow) == (
        401,
        {"message": message, "type": "authentication_error", "param": None, "code": "invalid_token"},
    )
    assert "authorization" not in flow.request.headers
    assert "msk_addon_secret" not in flow.response.text


def test_a_refused_flow_keeps_no_credential_and_auth_leaves_foreign_flows_alone():
    refused = authenticated({"authorization": "Bearer garbage"}, "/v1/forward?u=https://evil.example/")
    assert error_of(refused)[0] == 403
    assert "authorization" not in refused.request.headers  # the stored flow keeps no secret

    auth = Auth()
    foreign = tflow.tflow()
    foreign.request.headers["authorization"] = "Bearer upstream-credential"
    with taddons.context(auth):
        auth.requestheaders(foreign)
    assert foreign.request.headers["authorization"] == "Bearer upstream-credential"
    assert foreign.response is None


@pytest.mark.parametrize(
    "path, headers",
    [
        ("/anthropic/v1/messages", {"x-api-key": TOKEN}),
        ("/google/v1beta/models/g:generateContent", {"x-goog-api-key": TOKEN}),
        (f"/google/v1beta/models/g:generateContent?key={TOKEN}", {}),
    ],
    ids=["x-api-key", "x-goog-api-key", "query-key"],
)
def test_the_token_is_accepted_where_each_sdk_puts_its_key(path, headers):
    flow = authenticated(headers, path)
    assert flow.response is None
    assert call_of(flow).token.secret_key == "msk_addon_secret"
    assert TOKEN not in flow.request.url


def test_managed_keys_rotate_over_comma_separated_keys():
    keys = ManagedKeys({"OPENAI_API_KEY": " sk-1, sk-2,,sk-3 ", "ANTHROPIC_API_KEY": "ant-1"})
    openai, anthropic = Registry().by_name["openai"], Registry().by_name["anthropic"]
    assert [keys.next_key(openai) for _ in range(4)] == ["sk-1", "sk-2", "sk-3", "sk-1"]
    assert [keys.next_key(anthropic) for _ in range(2)] == ["ant-1", "ant-1"]
    assert keys.next_key(openai) == "sk-2"  # each provider keeps its own turn


@pytest.mark.parametrize("environ", [{}, {"OPENAI_API_KEY": ""}, {"OPENAI_API_KEY": " , ,"}])
def test_no_managed_key(environ):
    assert ManagedKeys(environ).next_key(Registry().by_name["openai"]) is None


@pytest.fixture
def accounts(tmp_path):
    path = tmp_path / "ledger.sqlite"
    store = Store(path)
    merchant, secret_key = store.create_merchant("m")
    product, product_secret = store.create_product(merchant["id"], "p", ProductFees())
    wallet = store.create_wallet("w")
    _, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    store.close()
    ledger = Ledger()
    ledger.writer = LedgerWriter(path)
    ledger.gateway = new_gateway(DEFAULT_LEASE)
    auth = Auth()
    auth.managed_keys = ManagedKeys({"OPENAI_API_KEY": "sk-managed-1,sk-managed-2", "ANTHROPIC_API_KEY": "ant-managed"})
    secrets = dict(secret_key=secret_key, connection_secret=connection_secret, product_secret=product_secret)
    yield auth, ledger, secrets
    ledger.writer.stop()


def keyed(auth: Auth, path: str, token: str) -> http.HTTPFlow:
    flow = routed(path, {"authorization": f"Bearer {token}"})
    with taddons.context(auth):
        auth.requestheaders(flow)
        auth.request(flow)
    return flow


@pytest.mark.parametrize(
    "path, byok, header, value",
    [
        ("/openai/v1/chat/completions", None, "authorization", "Bearer sk-managed-1"),
        ("/openai/v1/chat/completions", "sk-mine", "authorization", "Bearer sk-mine"),
        ("/anthropic/v1/messages", None, "x-api-key", "ant-managed"),
        ("/google/v1beta/models/g:generateContent", "AIza-mine", "x-goog-api-key", "AIza-mine"),
    ],
)
def test_auth_request_injects_the_key_in_the_providers_style(accounts, path, byok, header, value):
    auth, _, secrets = accounts
    flow = keyed(auth, path, encode_token(**secrets, provider_key=byok))
    assert flow.response is None
    assert flow.request.headers.get_all(header) == [value]
    flow.response = http.Response.make(200)
    auth.responseheaders(flow)
    assert flow.request.headers[header] == REDACTED


def test_auth_request_refuses_managed_mode_without_a_managed_key(accounts):
    auth, _, secrets = accounts
    flow = keyed(auth, "/mistral/v1/chat/completions", encode_token(**secrets))
    status, error = error_of(flow)
    assert (status, error["code"]) == (403, "no_managed_key")
    assert "authorization" not in flow.request.headers


def admitted(ledger: Ledger, flow: http.HTTPFlow) -> http.HTTPFlow:
    with taddons.context(ledger):
        asyncio.run(ledger.request(flow))
    return flow


def test_admission_checks_the_tokens_secrets_and_writes_the_pending_row(accounts):
    auth, ledger, secrets = accounts
    flow = admitted(ledger, keyed(auth, "/openai/v1/chat/completions", encode_token(**secrets)))
    call = call_of(flow)
    assert flow.response is None and call.opened
    assert call.principal.product_id.startswith("prd_")
    assert ledger.writer.store.request(call.request_id)["status"] == "pending"


def test_admission_refuses_an_unknown_secret_with_401(accounts):
    auth, ledger, secrets = accounts
    token = encode_token(**{**secrets, "secret_key": "msk_unknown"})
    flow = admitted(ledger, keyed(auth, "/openai/v1/chat/completions", token))
    assert (error_of(flow)[0], call_of(flow).opened) == (401, False)
    assert ledger.writer.store.request(call_of(flow).request_id) is None


def test_the_database_stays_while_the_gateway_runs(tmp_path):
    """A call completes in the database that admitted it: switching databases under the calls in
    flight would leave their rows pending in one and their completions lost in the other."""
    ledger = Ledger()
    with taddons.context(ledger) as tctx:
        tctx.configure(ledger, meterproxy_db=str(tmp_path / "one.sqlite"))
        writer = ledger.writer
        tctx.configure(ledger, meterproxy_db=str(tmp_path / "." / "one.sqlite"))  # the same database
        with pytest.raises(exceptions.OptionsError, match="meterproxy_db cannot change while the gateway runs"):
            tctx.configure(ledger, meterproxy_db=str(tmp_path / "two.sqlite"))
        assert (ledger.writer, tctx.options.meterproxy_db) == (writer, str(tmp_path / "one.sqlite"))
        ledger.done()
    assert not (tmp_path / "two.sqlite").exists()


def test_a_call_that_ends_after_the_ledger_stopped_is_not_recorded_and_says_so(accounts, caplog):
    """mitmproxy may let an admission finish during a stop, after the ledger's `done`: the
    gateway's retirement has interrupted its row (or the next sweep will)."""
    auth, ledger, secrets = accounts
    flow = admitted(ledger, keyed(auth, "/openai/v1/chat/completions", encode_token(**secrets)))
    writer, ledger.writer = ledger.writer, None  # as `done` leaves it
    try:
        with taddons.context(ledger):
            ledger.error(flow)
    finally:
        ledger.writer = writer
    request_id = call_of(flow).request_id
    assert f"the completion of {request_id} (its row is interrupted) is not recorded" in caplog.text
    assert writer.store.request(request_id)["status"] == "pending"


def test_admission_refuses_with_503_when_the_ledger_cannot_record_the_call(accounts, monkeypatch):
    """Never forwarded unrecorded: a database locked past the writer's patience (or full) is a
    503 that SDKs try again, not a 500."""
    auth, ledger, secrets = accounts
    monkeypatch.setattr(meterproxy.writer, "LOCKED_PATIENCE", 0.1)
    other = sqlite3.connect(ledger.writer.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        flow = admitted(ledger, keyed(auth, "/openai/v1/chat/completions", encode_token(**secrets)))
    finally:
        other.close()
    status, error = error_of(flow)
    assert (status, error["code"], error["type"]) == (503, "ledger_unavailable", "service_unavailable")
    assert flow.response.headers["retry-after"] == "1"
    assert not call_of(flow).opened


def test_the_metering_api_answers_503_when_the_ledger_cannot_record_the_usage(tmp_path, monkeypatch):
    monkeypatch.setattr(meterproxy.writer, "LOCKED_PATIENCE", 0.1)
    ledger, routing = Ledger(), Routing()
    api = MeteringApi(ledger, routing)
    with taddons.context(ledger, routing) as tctx:
        tctx.configure(ledger, meterproxy_db=str(tmp_path / "ledger.sqlite"))
        _, secret_key = ledger.writer.store.create_merchant("m")
        body = {"model": "gpt-4o-mini", "provider": "openai", "input_tokens": 3, "output_tokens": 2}
        flow = tflow.tflow(req=tflow.treq(method=b"POST", path=b"/v1/requests", content=json.dumps(body).encode()))
        flow.request.headers["authorization"] = f"Bearer {secret_key}"
        flow.server_conn.address = None  # addressed to the gateway itself
        other = sqlite3.connect(ledger.writer.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            tctx.master.event_loop.run_until_complete(api.request(flow))
        finally:
            other.close()
        ledger.done()
    status, error = error_of(flow)
    assert (status, error["code"], flow.response.headers["retry-after"]) == (503, "ledger_unavailable", "1")


# --- Metering -----------------------------------------------------------------------------------


def metered(body: object, path: str = "/openai/v1/chat/completions", headers: dict | None = None) -> http.HTTPFlow:
    flow = routed(path, {"accept-encoding": "gzip, br", **(headers or {})}, body)
    metering = Metering()
    with taddons.context(metering):
        metering.request(flow)
    return flow


MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_stream_gets_include_usage_and_identity_encoding():
    flow = metered({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "temperature": 0})
    call = call_of(flow)
    assert json.loads(flow.request.content) == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    assert flow.request.headers["content-length"] == str(len(flow.request.content))
    assert flow.request.headers["accept-encoding"] == "identity"
    assert (call.model, call.stream, call.drop_usage_event) == ("gpt-4o-mini", True, True)


def test_include_usage_is_added_to_the_clients_own_bytes():
    """A body without stream_options is not serialized again (a long prompt would be): the
    option goes before its closing brace, the rest is the client's bytes."""
    sent = b'{"model": "gpt-4o-mini",\n "messages": [{"role": "user", "content": "caf\\u00e9"}], "stream": true}\n'
    flow = metered(sent)
    assert call_of(flow).drop_usage_event
    assert flow.request.content == sent.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'
    assert json.loads(flow.request.content)["stream_options"] == {"include_usage": True}


def test_include_usage_false_is_turned_on_keeping_other_stream_options():
    flow = metered(
        {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": False, "x": 1},
        }
    )
    assert json.loads(flow.request.content)["stream_options"] == {"include_usage": True, "x": 1}
    assert call_of(flow).drop_usage_event is True


@pytest.mark.parametrize(
    "body, path",
    [
        (
            {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
            "/openai/v1/chat/completions",
        ),
        ({"model": "gpt-4o-mini", "messages": MESSAGES}, "/openai/v1/chat/completions"),
        ({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": "yes"}, "/openai/v1/chat/completions"),
        ({"model": "gpt-4o-mini", "input": "hi", "stream": True}, "/openai/v1/responses"),
        ({"model": "claude-sonnet-4-0", "messages": MESSAGES, "stream": True}, "/anthropic/v1/messages"),
    ],
    ids=["client-asked-for-usage", "not-streamed", "stream-not-true", "responses-api", "anthropic"],
)
def test_the_body_is_left_exactly_as_sent_when_usage_need_not_be_asked_for(body, path):
    raw = json.dumps(body, separators=(",", ":")).encode()
    flow = metered(raw, path)
    assert flow.request.content == raw
    assert flow.request.headers["accept-encoding"] == "gzip, br"
    assert call_of(flow).drop_usage_event is False
    assert call_of(flow).model == body["model"]


@pytest.mark.parametrize(
    "body, code, message",
    [
        (b"not json", "invalid_json", "request body is not valid JSON"),
        (b'{"model": "gpt-4o-mini",', "invalid_json", "request body is not valid JSON"),
        (b'["gpt-4o-mini"]', "invalid_json", "request body must be a JSON object"),
        (b'{"messages": []}', "missing_model", "request body has no model"),
        (b'{"model": "", "messages": []}', "missing_model", "request body has no model"),
        (b'{"model": 4, "messages": []}', "missing_model", "request body has no model"),
        (b'{"model": null}', "missing_model", "request body has no model"),
    ],
)
def test_bad_bodies_are_400(body, code, message):
    flow = metered(body)
    assert error_of(flow) == (400, {"message": message, "type": "invalid_request_error", "param": None, "code": code})


def test_a_request_without_a_body_is_not_checked():
    flow = routed("/openai/v1/models")
    flow.request.method = "GET"
    Metering().request(flow)
    assert flow.response is None and call_of(flow).model is None


def test_a_non_streamed_response_body_is_metered():
    flow = metered({"model": "gpt-4o-mini", "messages": MESSAGES})
    flow.response = http.Response.make(
        200,
        json.dumps(
            {
                "id": "chatcmpl-1",
                "model": "gpt-4o-mini-2024-07-18",
                "usage": {"prompt_tokens": 9, "completion_tokens": 3},
            }
        ),
        {"content-type": "application/json"},
    )
    metering = Metering()
    metering.responseheaders(flow)
    metering.response(flow)
    call = call_of(flow)
    assert flow.response.stream is False
    assert (call.dialect.usage.input_tokens, call.dialect.usage.output_tokens) == (9, 3)
    assert (call.dialect.reply.response_id, call.dialect.reply.model) == ("chatcmpl-1", "gpt-4o-mini-2024-07-18")


@pytest.mark.parametrize(
    "drop, encoding, handed_on",
    [(True, None, None), (True, "gzip", None), (False, "gzip", "gzip"), (False, None, None)],
)
def test_an_event_stream_response_is_teed_through_the_meter(drop, encoding, handed_on):
    """When the meter may drop an event it hands on decoded bytes, so the encoding header goes."""
    options = {} if drop else {"stream_options": {"include_usage": True}}
    flow = metered({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, **options})
    headers = {
        "content-type": "text/event-stream; charset=utf-8",
        **({"content-encoding": encoding} if encoding else {}),
    }
    flow.response = http.Response.make(200, b"", headers)
    metering = Metering()
    metering.responseheaders(flow)
    call = call_of(flow)
    assert call.drop_usage_event is drop
    assert isinstance(flow.response.stream, StreamMeter) and flow.response.stream.dialect is call.dialect
    assert flow.response.headers.get("content-encoding") == handed_on


# --- the pipeline that runs the concerns as one addon ---------------------------------------------


class Concern:
    """Records its hooks' calls; `waits` makes its `request` hook a coroutine that yields once."""

    def __init__(self, name: str, seen: list, waits: bool = False) -> None:
        self.name, self.seen, self.waits = name, seen, waits

    def load(self, loader):
        loader.add_option(f"pipeline_{self.name}", bool, False, "An option of a concern.")

    def done(self):
        self.seen.append(f"{self.name} done")

    def request(self, flow: http.HTTPFlow):
        if self.waits:
            return self._wait()
        self.seen.append(self.name)
        return None

    async def _wait(self) -> None:
        await asyncio.sleep(0)
        self.seen.append(self.name)


def test_the_pipeline_calls_the_concerns_in_turn_and_waits_where_one_waits():
    seen: list = []
    pipeline = Pipeline(Concern("first", seen), Concern("waits", seen, waits=True), Concern("last", seen))
    with taddons.context(pipeline) as tctx:
        assert "pipeline_first" in tctx.options and "pipeline_last" in tctx.options  # load reached each
        flow = tflow.tflow()
        pending = pipeline.request(flow)
        assert seen == ["first"]  # the concern after the one that waits has not run yet
        tctx.master.event_loop.run_until_complete(pending)
        assert seen == ["first", "waits", "last"]
        seen.clear()
        tctx.master.event_loop.run_until_complete(tctx.master.addons.handle_lifecycle(HttpRequestHook(flow)))
        assert seen == ["first", "waits", "last"]  # and mitmproxy awaits it
    assert not hasattr(pipeline, "response")  # no concern has it: mitmproxy skips the pipeline


def test_the_pipeline_does_not_make_a_coroutine_when_no_concern_waits():
    seen: list = []
    pipeline = Pipeline(Concern("one", seen), Concern("two", seen))
    assert pipeline.request(tflow.tflow()) is None
    assert seen == ["one", "two"]


def test_an_error_in_one_concern_leaves_the_next_ones_their_hooks(caplog):
    """As mitmproxy does for its addons: whatever an earlier concern did, the ledger still
    completes the call."""
    seen: list = []

    class Breaks:
        def response(self, flow):
            raise RuntimeError("broken")

    class BreaksAfterWaiting:
        def response(self, flow):
            return self._break()

        async def _break(self):
            await asyncio.sleep(0)
            raise RuntimeError("broken later")

    class Records:
        def response(self, flow):
            seen.append("completed")

    pipeline = Pipeline(Breaks(), Records(), BreaksAfterWaiting(), Records())
    with taddons.context(pipeline) as tctx:
        tctx.master.event_loop.run_until_complete(pipeline.response(tflow.tflow(resp=True)))
    assert seen == ["completed", "completed"]
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert [error.rpartition(".<locals>.")[2] for error in errors] == ["Breaks.response", "BreaksAfterWaiting.response"]


def test_an_option_a_concern_refuses_stays_refused():
    class Refuses:
        def load(self, loader):
            loader.add_option("pipeline_limit", int, 1, "A limit a concern checks.")

        def configure(self, updated):
            if "pipeline_limit" in updated and ctx.options.pipeline_limit < 1:
                raise exceptions.OptionsError("pipeline_limit must be at least 1")

    pipeline = Pipeline(Refuses())
    with taddons.context(pipeline) as tctx:
        with pytest.raises(exceptions.OptionsError, match="at least 1"):
            tctx.configure(pipeline, pipeline_limit=0)
        assert tctx.options.pipeline_limit == 1


def test_a_scripts_unload_reaches_every_concern():
    """mitmproxy unloads a script (on a reload) with a done event it does not await: the
    concerns after the retries (the ledger's writer among them) must still stop."""
    seen: list = []
    pipeline = Pipeline(Concern("one", seen), Retries(Auth()), Concern("two", seen))
    with taddons.context(pipeline) as tctx:
        tctx.master.addons.remove(pipeline)
    assert seen == ["one done", "two done"]


def test_the_pipeline_refuses_a_concern_that_would_wait_where_mitmproxy_does_not():
    class WaitsToStop:
        async def done(self):
            pass

    with pytest.raises(TypeError, match="WaitsToStop.done: mitmproxy may call done without awaiting it"):
        Pipeline(Concern("one", []), WaitsToStop())


def test_retries_close_their_client_when_unloaded():
    retries = Retries(Auth())
    with taddons.context(Pipeline(retries)) as tctx:

        async def use_then_unload():
            client = retries.client
            tctx.master.addons.remove(tctx.master.addons.chain[-1])  # as a script's reload does
            for _ in range(1000):  # loop turns, not time: a few are enough
                if client.is_closed:
                    break
                await asyncio.sleep(0)
            return client

        assert tctx.master.event_loop.run_until_complete(use_then_unload()).is_closed


def test_a_streams_stall_timer_goes_when_the_stream_ends():
    """Otherwise each ended stream's flow would be kept until its stall timeout (a minute)."""
    watch = UpstreamWatch()
    with taddons.context(Retries(Auth()), watch) as tctx:
        flow = tflow.tflow(resp=True)
        call = Call("req_stream", meter=StreamMeter(OpenAIChat("gpt-4o-mini"), bytes, drop_usage_event=False))
        flow.metadata[CALL] = call

        async def stream_then_end():
            watch.responseheaders(flow)
            stall_timer = call.watchdog
            assert stall_timer is not None and not stall_timer.cancelled()
            watch.response(flow)
            return stall_timer

        assert tctx.master.event_loop.run_until_complete(stream_then_end()).cancelled()


def test_the_pipeline_knows_every_hook_whatever_was_imported_before_it():
    """mitmproxy registers a hook when the module defining it is imported: in a fresh
    interpreter, importing the pipeline alone must be enough."""
    probe = (
        "from addons.pipeline import Pipeline\n"
        "class Concern:\n"
        "    def request(self, flow): pass\n"
        "    def tls_clienthello(self, data): pass\n"
        "pipeline = Pipeline(Concern())\n"
        "print(hasattr(pipeline, 'request'), hasattr(pipeline, 'tls_clienthello'))\n"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert found.stdout.split() == ["True", "True"]
