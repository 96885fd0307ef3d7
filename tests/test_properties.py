"""Property-based tests (hypothesis) of the gateway's input boundary.

Whatever a client sends:

1. `forward_target`, `Registry.resolve` and `Registry.route` refuse only with a `GatewayError`
   of 400, 403 or 404 (SPEC §1.1, §7), never with any other exception;
2. a target `resolve` accepts is exactly a registered provider's origin, also when a providers
   file overrides the upstreams (SPEC §1.1, §4);
3. `decode_token` refuses only with a 401 that echoes nothing of the token, and undoes
   `encode_token` (SPEC §2);
4. `parse_metadata` / `validate_metadata` refuse only with a 400 and accept only what SPEC §7
   allows;
5. through the addons (Routing, Auth, the ledger's admission), a managed key only ever goes to
   its own provider's upstream, in its own header, and a refused call carries no managed key at
   all (SPEC §2);
6. the routing answers bad input with a 4xx of SPEC §7, not with its fail-closed 500.

Pure tests: no sockets and no database; the addons run in `mitmproxy.test.taddons` contexts on
`tflow` flows, and the ledger's writer is a stub that admits every token as a managed principal.
"""

import base64
import inspect
import json
import re
import string
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.net.http import url as mitmproxy_url
from mitmproxy.test import taddons, tflow

from addons.auth import KEY_HEADERS, Auth, ManagedKeys
from addons.calls import call_of
from addons.ledger import Ledger
from addons.routing import Routing
from meterproxy.errors import GatewayError
from meterproxy.leases import DEFAULT_LEASE, new_gateway
from meterproxy.metadata import MAX_LENGTH, MAX_PAIRS, parse_metadata, validate_metadata
from meterproxy.providers import BUILT_IN, AuthStyle, Provider, Registry, forward_target
from meterproxy.store import Principal
from meterproxy.token import MAX_TOKEN_LENGTH, decode_token, encode_token
from pricing.fees import ProductFees

DEFAULT_PORTS = {"http": 80, "https": 443}


def examples(count: int) -> settings:
    """Hypothesis settings for `count` examples; no deadline (a loaded CI machine is slow)."""
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# A providers file that moves three upstreams and adds a local OpenAI-compatible provider.
LOCAL_BASE = "http://127.0.0.1:8000"
OVERRIDES_TOML = f"""
[providers.openai]
upstream = "http://127.0.0.1:9911/openai"

[providers.anthropic]
upstream = "http://localhost:9912/"

[providers.google]
upstream = "https://gemini.internal.example:8443/proxy"

[providers.local]
base_url = "{LOCAL_BASE}"
key_env = "LOCAL_API_KEY"
"""

# Every origin either registry knows; the strategies disguise these.
KNOWN_BASES = [provider.base_url for provider in BUILT_IN] + [LOCAL_BASE]
KNOWN_HOSTS = sorted({urllib.parse.urlsplit(base).hostname for base in KNOWN_BASES})
PROVIDER_NAMES = [provider.name for provider in BUILT_IN] + ["local"]


def origin_of(url: str) -> tuple[str, str | None, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]


def upstream_base(provider: Provider) -> str:
    return provider.upstream or provider.base_url


@pytest.fixture(scope="module")
def providers_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("providers") / "providers.toml"
    path.write_text(OVERRIDES_TOML)
    return path


@pytest.fixture(scope="module", params=["built-in", "overridden"])
def registry(request, providers_file) -> Registry:
    return Registry() if request.param == "built-in" else Registry.from_file(providers_file)


# --- strategies: any input ----------------------------------------------------------------------

any_text = st.text(max_size=60)
latin1_text = st.binary(max_size=60).map(lambda raw: raw.decode("latin-1"))  # arbitrary bytes


def repeated(character: str, shortest: int, longest: int) -> st.SearchStrategy[str]:
    """One character repeated, around a length limit (cheaper to draw than st.text)."""
    return st.integers(shortest, longest).map(lambda length: character * length)


# --- strategies: URLs ---------------------------------------------------------------------------

SCHEMES = ["https", "http", "HTTPS", "ftp", "javascript", ""]
SCHEME_SEPARATORS = ["://", "://", "://", ":", ":/", ":///", "//"]
PORTS = ["", ":443", ":80", ":0", ":8443", ":8000", ":65536", ":abc", ":", ":0443", ":-1"]

# How a provider's host can be disguised; each keeps the real host somewhere in the string.
HOST_DISGUISES: list[tuple[str, Callable[[str], str]]] = [
    ("exact", lambda host: host),
    ("upper case", str.upper),
    ("trailing dot", lambda host: host + "."),
    ("suffix", lambda host: host + ".evil.example"),
    ("glued suffix", lambda host: host + "evil.example"),
    ("prefix", lambda host: "evil." + host),
    ("dash prefix", lambda host: "evil-" + host),
    ("userinfo", lambda host: "a@" + host),
    ("user and password", lambda host: "user:pass@" + host),
    ("host as userinfo", lambda host: host + "@evil.example"),
    ("host and port as userinfo", lambda host: host + ":443@evil.example"),
    ("backslash userinfo", lambda host: host + "\\@evil.example"),
    ("percent-encoded dots", lambda host: host.replace(".", "%2e")),
    ("ideographic dots", lambda host: host.replace(".", "\u3002")),
    ("fullwidth dots", lambda host: host.replace(".", "\uff0e")),
    ("encoded NUL", lambda host: host + "%00.evil.example"),
    ("bracketed", lambda host: f"[{host}]"),
]
OTHER_HOSTS = [
    "127.0.0.1",
    "2130706433",
    "0x7f.0.0.1",
    "0x7f000001",
    "017700000001",
    "0177.0.0.1",
    "127.1",
    "169.254.169.254",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[fe80::1%25eth0]",
    "[::1",
    "::1]",
    "localhost",
    "evil.example",
    "",
]


@st.composite
def mixed_case(draw, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(char.upper() if flip else char for char, flip in zip(text, flips))


disguised_hosts = st.builds(
    lambda disguise, host: disguise[1](host), st.sampled_from(HOST_DISGUISES), st.sampled_from(KNOWN_HOSTS)
)
near_miss_hosts = st.one_of(
    disguised_hosts, st.sampled_from(KNOWN_HOSTS).flatmap(mixed_case), st.sampled_from(OTHER_HOSTS)
)

# Path pieces that have fooled URL parsers: dot segments (raw and encoded), slashes, backslashes,
# control characters, spaces, userinfo-looking segments, non-ASCII.
PATH_PIECES = [
    "v1",
    "chat",
    "completions",
    "models",
    "g:generateContent",
    "..",
    ".",
    "%2e%2e",
    "%2E%2e",
    "%2e",
    ".%2e",
    "",
    "\\",
    "..\\",
    "\r\n",
    "\n",
    " ",
    "\t",
    "%00",
    "%2f",
    "%5c",
    "@evil.example",
    "evil.example",
    ";x",
    "é",
]
PATH_LEADS = ["/", "/", "", "//", "\\", "/./", "/../", "/%2e%2e/"]
QUERY_PIECES = ["alt=sse", "key=x", "a=1&b=2", "u=https://evil.example/", "@evil.example", "?", ""]
FRAGMENTS = ["", "", "", "#", "#frag", "#@evil.example"]

path_segments = st.one_of(st.sampled_from(PATH_PIECES), st.text(max_size=6))
queries = st.one_of(
    st.just(""), st.builds(lambda text: "?" + text, st.one_of(st.sampled_from(QUERY_PIECES), st.text(max_size=10)))
)
url_paths = st.builds(
    lambda lead, segments, query, fragment: lead + "/".join(segments) + query + fragment,
    st.sampled_from(PATH_LEADS),
    st.lists(path_segments, max_size=5),
    queries,
    st.sampled_from(FRAGMENTS),
)
near_miss_urls = st.builds(
    lambda scheme, separator, host, port, path: scheme + separator + host + port + path,
    st.sampled_from(SCHEMES),
    st.sampled_from(SCHEME_SEPARATORS),
    near_miss_hosts,
    st.sampled_from(PORTS),
    url_paths,
)

# URLs that a registry should accept, in the spellings clients use.
SAFE_CHARACTERS = string.ascii_letters + string.digits + "-_:~"
safe_segments = st.text(alphabet=SAFE_CHARACTERS, min_size=1, max_size=10)
safe_queries = st.one_of(st.just(""), st.text(alphabet=SAFE_CHARACTERS + "=&%/?.", max_size=12).map("?{}".format))
safe_paths = st.builds(
    lambda segments, query: "/" + "/".join(segments) + query, st.lists(safe_segments, max_size=4), safe_queries
)


@st.composite
def provider_urls(draw) -> str:
    scheme, host, port = origin_of(draw(st.sampled_from(KNOWN_BASES)))
    spelled_port = draw(st.sampled_from(["", f":{port}"]))
    return draw(mixed_case(scheme)) + "://" + draw(mixed_case(host)) + spelled_port + draw(safe_paths)


target_urls = st.one_of(provider_urls(), near_miss_urls)


# --- 1. forward_target, resolve and route refuse only with 400/403/404 --------------------------


def outcome(action: Callable[[], object], statuses: set[int]) -> object:
    """The action's result, or the GatewayError it raised, whose status must be one of
    `statuses`; any other exception fails the test."""
    try:
        return action()
    except GatewayError as error:
        assert error.status in statuses, error
        return error


forward_queries = st.builds(
    lambda before, encode, url, after: before + "u=" + (urllib.parse.quote(url, safe="") if encode else url) + after,
    st.sampled_from(["", "metadata=%7B%7D&", "a=b&", "u=https://evil.example/&"]),
    st.booleans(),
    target_urls,
    st.sampled_from(["", "&metadata=%7B%7D", "&u=https://evil.example/", "&", "&key=x"]),
)


@examples(200)
@given(query=st.one_of(any_text, latin1_text, forward_queries))
def test_forward_target_then_resolve_refuses_only_with_a_gateway_error(registry, query):
    url, params = forward_target(query)
    assert isinstance(url, str)
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in params.items())
    outcome(lambda: registry.resolve(url), {400, 403})


@examples(200)
@given(url=st.one_of(any_text, latin1_text, near_miss_urls))
def test_resolve_refuses_only_with_a_gateway_error(registry, url):
    result = outcome(lambda: registry.resolve(url), {400, 403})
    event("refused" if isinstance(result, GatewayError) else "accepted")


@examples(150)
@given(name=st.one_of(st.sampled_from(PROVIDER_NAMES), any_text), path=st.one_of(url_paths, any_text, latin1_text))
def test_route_refuses_only_with_a_gateway_error(registry, name, path):
    outcome(lambda: registry.route(name, path), {400, 403, 404})


# --- 2. an accepted target is exactly a registered provider -------------------------------------


def assert_is_exactly_a_provider(registry: Registry, url: str, target) -> None:
    provider = target.provider
    assert registry.by_name[provider.name] is provider
    canonical = urllib.parse.urlsplit(target.url)
    assert origin_of(target.url) == provider.origin
    assert canonical.username is None and canonical.password is None and "@" not in canonical.netloc
    named = urllib.parse.urlsplit(url)
    assert named.hostname == provider.origin[1]  # .hostname is lower-cased
    assert origin_of(url) == provider.origin and "@" not in named.netloc  # no userinfo trick
    base = upstream_base(provider)
    assert target.upstream_url.startswith(base) and target.upstream_url[len(base)] == "/"
    assert origin_of(target.upstream_url) == origin_of(base)
    assert registry.resolve(target.url) == target  # the canonical URL is a fixed point


@examples(250)
@given(url=target_urls)
def test_an_accepted_target_is_exactly_a_registered_provider(registry, url):
    result = outcome(lambda: registry.resolve(url), {400, 403})
    if isinstance(result, GatewayError):
        event(f"refused {result.status}")
        return
    event(f"accepted: {result.provider.name}")
    assert_is_exactly_a_provider(registry, url, result)


# --- strategies: JSON and tokens ----------------------------------------------------------------


def json_of(scalars: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=12,
    )


json_values = json_of(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
# Without floats, whose text does not survive the masking below unchanged in length.
json_values_without_floats = json_of(st.none() | st.booleans() | st.integers() | st.text(max_size=20))

TOKEN_FIELDS = ["secret_key", "connection_secret", "product_secret", "provider_key"]
token_field_values = st.one_of(
    st.text(max_size=30),
    repeated("x", 1020, 1030),  # around the 1024-character limit
    json_values_without_floats,
)
token_objects = st.builds(
    lambda fields, extra: {**extra, **fields},
    st.fixed_dictionaries({}, optional={field: token_field_values for field in TOKEN_FIELDS}),
    st.dictionaries(st.text(max_size=8), json_values_without_floats, max_size=3),
)


def standard_base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def urlsafe_unpadded_base64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def padded_with_whitespace(data: bytes) -> str:
    return f" \t{standard_base64(data)}\n"


TOKEN_ENCODINGS = [standard_base64, urlsafe_unpadded_base64, padded_with_whitespace]
token_encodings = st.sampled_from(TOKEN_ENCODINGS)

json_texts = st.one_of(
    json_values.map(json.dumps),
    token_objects.map(json.dumps),
    st.integers(1, 6000).map(lambda depth: "[" * depth + "]" * depth),  # deep nesting
    st.integers(1, 3000).map(lambda depth: '{"secret_key":' * depth + "1" + "}" * depth),
    st.integers(4290, 4310).map(lambda digits: "9" * digits),  # around int's 4300-digit limit
    any_text,
)
token_payloads = st.one_of(json_texts.map(str.encode), st.binary(max_size=60))
raw_tokens = st.one_of(
    st.builds(lambda encode, payload: encode(payload), token_encodings, token_payloads),
    any_text,
    latin1_text,
    repeated("A", MAX_TOKEN_LENGTH - 2, MAX_TOKEN_LENGTH + 2),  # the length limit
    st.integers(MAX_TOKEN_LENGTH, 4 * MAX_TOKEN_LENGTH).map(lambda length: "e30=" * (length // 4)),
)


# --- 3. decode_token refuses only with 401, echoes nothing, undoes encode_token ------------------


def decode_or_refusal(raw: str):
    return outcome(lambda: decode_token(raw), {401})


@examples(200)
@given(raw=raw_tokens)
def test_decode_token_refuses_only_with_401(raw):
    result = decode_or_refusal(raw)
    event(f"refused: {result.message.partition(':')[0]}" if isinstance(result, GatewayError) else "accepted")


def leaves(value: object) -> Iterator[str]:
    """The text of every string and integer inside a JSON value (keys are not values)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, int) and not isinstance(value, bool):
        yield str(value)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)


def masked(value: object, letter: str, digit: str) -> object:
    """The same JSON value with every letter and digit of its strings and integers replaced:
    same types, same lengths, so the same validation outcome, but other contents."""
    if isinstance(value, str):
        return re.sub(r"[A-Za-z]", letter, re.sub(r"[0-9]", digit, value))
    if isinstance(value, int) and not isinstance(value, bool):
        return int(re.sub(r"[0-9]", digit, str(value)))
    if isinstance(value, list):
        return [masked(item, letter, digit) for item in value]
    if isinstance(value, dict):
        return {key: masked(item, letter, digit) for key, item in value.items()}
    return value


def refusal_message(value: object, encode: Callable[[bytes], str]) -> str:
    result = decode_or_refusal(encode(json.dumps(value).encode()))
    return result.message if isinstance(result, GatewayError) else ""


@examples(100)
@given(value=st.one_of(token_objects, json_values_without_floats), encode=token_encodings)
def test_a_refused_token_echoes_none_of_its_values(value, encode):
    message = refusal_message(value, encode)
    # A value may appear in the message only as the message's own wording: then it also
    # appears when the token's contents are replaced by other letters and digits.
    templates = [refusal_message(masked(value, letter, digit), encode) for letter, digit in (("a", "1"), ("b", "2"))]
    for leaf in leaves(value):
        if len(leaf) > 3 and leaf in message:
            assert all(leaf in template for template in templates), f"{leaf!r} echoed in {message!r}"


secret_texts = st.text(min_size=1, max_size=100)
billed_fields = st.fixed_dictionaries(
    {
        "secret_key": secret_texts,
        "connection_secret": secret_texts,
        "product_secret": secret_texts,
        "provider_key": st.none() | secret_texts,
    }
)
metering_only_fields = st.fixed_dictionaries(
    {
        "secret_key": secret_texts,
        "connection_secret": st.none(),
        "product_secret": st.none(),
        "provider_key": secret_texts,
    }
)


@examples(100)
@given(fields=billed_fields | metering_only_fields, reencode=token_encodings)
def test_decode_token_undoes_encode_token(fields, reencode):
    token = encode_token(**fields)
    assert decode_token(token).model_dump() == fields
    decoded = decode_token(reencode(base64.b64decode(token)))
    assert decoded.model_dump() == fields
    assert decoded.key_mode.value == ("managed" if fields["provider_key"] is None else "unmanaged")


# --- 4. metadata: refused only with 400, accepted only within SPEC §7 ----------------------------

valid_metadata_keys = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=MAX_LENGTH)
valid_metadata_values = st.text(min_size=1, max_size=MAX_LENGTH)
metadata_keys = st.one_of(
    valid_metadata_keys,
    st.text(max_size=8),
    repeated("a", MAX_LENGTH - 1, MAX_LENGTH + 2),
    st.sampled_from(["", "user-id", "é", "a b", "a\n"]),
)
metadata_values = st.one_of(
    valid_metadata_values,
    repeated("v", MAX_LENGTH - 1, MAX_LENGTH + 2),
    json_values,
)
short_metadata_keys = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=6)
short_metadata_values = st.text(min_size=1, max_size=6)
metadata_objects = st.one_of(
    st.dictionaries(metadata_keys, metadata_values, max_size=6),
    # around the 100-pair limit
    st.dictionaries(short_metadata_keys, short_metadata_values, min_size=MAX_PAIRS - 1, max_size=MAX_PAIRS + 1),
)


def within_spec(metadata: object) -> bool:
    """SPEC §7: a JSON object of at most 100 pairs, keys 1-255 characters of ASCII letters,
    digits and '_', values strings of 1-255 characters."""
    allowed = set(string.ascii_letters + string.digits + "_")
    return (
        isinstance(metadata, dict)
        and len(metadata) <= MAX_PAIRS
        and all(isinstance(key, str) and 1 <= len(key) <= MAX_LENGTH and set(key) <= allowed for key in metadata.keys())
        and all(isinstance(value, str) and 1 <= len(value) <= MAX_LENGTH for value in metadata.values())
    )


@examples(100)
@given(value=st.one_of(metadata_objects, json_values))
def test_validate_metadata_accepts_exactly_what_the_spec_allows(value):
    result = outcome(lambda: validate_metadata(value), {400})
    event("refused" if isinstance(result, GatewayError) else "accepted")
    assert isinstance(result, GatewayError) != within_spec(value)


metadata_json = st.one_of(metadata_objects.map(json.dumps), json_values.map(json.dumps), any_text)
HEADER_PREFIXES = ["x-lava-metadata-", "X-Lava-Metadata-", "x-lava-metadata", "x-lava-", ""]
metadata_headers = st.lists(
    st.tuples(st.builds(str.__add__, st.sampled_from(HEADER_PREFIXES), metadata_keys), st.text(max_size=12)),
    max_size=5,
)


@examples(100)
@given(query=st.none() | metadata_json, header=st.none() | metadata_json, headers=metadata_headers)
def test_parse_metadata_refuses_only_with_400_and_accepts_only_what_the_spec_allows(query, header, headers):
    result = outcome(lambda: parse_metadata(query, header, headers), {400})
    event("refused" if isinstance(result, GatewayError) else "accepted")
    if not isinstance(result, GatewayError):
        assert within_spec(result)
        prefix = "x-lava-metadata-"
        sources = [json.loads(raw) for raw in (query, header) if raw is not None]
        sources.append({name[len(prefix) :]: value for name, value in headers if name.lower().startswith(prefix)})
        for key, value in result.items():  # nothing invented: every pair came from an input
            assert any(source.get(key) == value for source in sources)


# --- the addons: Routing, Auth and the ledger's admission, on tflow flows -----------------------

FORWARD_TOKEN = encode_token(secret_key="msk_props", connection_secret="cs_props", product_secret="ps_props")
MANAGED_PRINCIPAL = Principal("mer_1", "con_1", "wal_1", "prd_1", ProductFees())
FLOW_BODY = b'{"model": "m"}'


class StubStore:
    """Admits every call: any token names a managed principal, and no row is written."""

    def authorize(self, token) -> Principal:
        return MANAGED_PRINCIPAL

    def open_request(self, row: dict, hold) -> None:
        pass


class StubWriter:
    """The ledger writer's `call`, run at once against the stub store."""

    async def call(self, job, atomic: bool = False):
        return job(StubStore())


def managed_keys_of(provider: Provider) -> list[str]:
    return [f"managed-{provider.name}-{turn}-Zq7xW" for turn in (1, 2)]


def key_header_value(provider: Provider, key: str) -> str:
    return f"Bearer {key}" if provider.auth is AuthStyle.BEARER else key


class GatewayUnderTest:
    """Routing, Auth and the ledger's admission, in `addons/gateway.py`'s order, in one taddons
    context; every provider has two managed keys."""

    def __init__(self, tctx, routing: Routing, auth: Auth, ledger: Ledger) -> None:
        self.tctx, self.routing, self.auth, self.ledger = tctx, routing, auth, ledger
        self.providers = list(routing.registry.by_name.values())
        self.managed_keys = [key for provider in self.providers for key in managed_keys_of(provider)]
        auth.managed_keys = ManagedKeys(
            environ={provider.key_env: ",".join(managed_keys_of(provider)) for provider in self.providers}
        )

    def send(self, path: str, headers: list[tuple[str, str]]) -> http.HTTPFlow:
        flow = tflow.tflow()
        flow.server_conn.address = None  # addressed to the gateway itself, not through a tunnel
        flow.request.host, flow.request.port = "127.0.0.1", 8080
        flow.request.path = path
        flow.request.headers = http.Headers(host="127.0.0.1:8080")
        for name, value in headers:
            flow.request.headers.add(name, value)
        flow.request.content = FLOW_BODY
        for hook in (self.routing.requestheaders, self.auth.requestheaders, self.auth.request, self.ledger.request):
            pending = hook(flow)
            if inspect.isawaitable(pending):
                self.tctx.master.event_loop.run_until_complete(pending)
        return flow


@contextmanager
def running_gateway(providers_file=None) -> Iterator[GatewayUnderTest]:
    routing, auth, ledger = Routing(), Auth(), Ledger()
    ledger.writer = StubWriter()  # the ledger is not loaded into the context: it opens no database
    ledger.gateway = new_gateway(DEFAULT_LEASE)
    with taddons.context(routing, auth) as tctx:
        if providers_file:
            tctx.configure(routing, meterproxy_providers=str(providers_file))
        try:
            yield GatewayUnderTest(tctx, routing, auth, ledger)
        finally:
            tctx.master.event_loop.close()


@pytest.fixture(scope="module", params=["built-in", "overridden"])
def gateway(request, providers_file) -> Iterator[GatewayUnderTest]:
    with running_gateway(providers_file if request.param == "overridden" else None) as gateway:
        yield gateway


# --- strategies: requests to the gateway --------------------------------------------------------

CREDENTIAL_PLACES = ["authorization", "x-api-key", "x-goog-api-key", "query key", "nowhere"]
EXTRA_HEADER_NAMES = ["host", "x-api-key", "x-goog-api-key", "authorization", "x-lava-metadata-user_id", "accept"]


def with_query_parameter(path: str, parameter: str) -> str:
    return path + ("&" if "?" in path else "?") + parameter


@st.composite
def gateway_requests(draw) -> tuple[str, list[tuple[str, str]]]:
    """A call the way SDKs send it (`/v1/forward?u=…` raw or encoded, `/<provider>/<path>`),
    to a provider or a near miss, with the forward token where some SDK puts its key."""
    form = draw(st.sampled_from(["forward raw", "forward encoded", "provider base"]))
    if form == "provider base":
        path = "/" + draw(st.sampled_from(PROVIDER_NAMES) | st.text(max_size=8)) + draw(url_paths | safe_paths)
    else:
        encoded = "u=" + urllib.parse.quote(draw(target_urls), safe="")
        query = draw(forward_queries) if form == "forward raw" else encoded
        path = draw(st.sampled_from(["/v1/forward?", "/v1/forward/?"])) + query
    headers = draw(st.lists(st.tuples(st.sampled_from(EXTRA_HEADER_NAMES), st.text(max_size=12)), max_size=3))
    place = draw(st.sampled_from(CREDENTIAL_PLACES))
    if place == "authorization":
        headers.append(("authorization", f"Bearer {FORWARD_TOKEN}"))
    elif place == "query key":
        path = with_query_parameter(path, f"key={FORWARD_TOKEN}")
    elif place != "nowhere":
        headers.append((place, FORWARD_TOKEN))
    return path, headers


# --- 5. a managed key only ever goes to its own provider ----------------------------------------


def request_texts(flow: http.HTTPFlow) -> list[str]:
    """Everything of the request that leaves the gateway: URL, headers, body."""
    texts = [flow.request.url, flow.request.get_content(strict=False).decode("latin-1")]
    return texts + [f"{name}: {value}" for name, value in flow.request.headers.items(multi=True)]


def keys_in(texts: list[str], keys: list[str]) -> list[str]:
    return [key for key in keys if any(key in text for text in texts)]


def assert_sent_only_to_its_provider(gateway: GatewayUnderTest, flow: http.HTTPFlow) -> None:
    call = call_of(flow)
    if call is None:  # not a gateway call: untouched, and no key on it
        assert keys_in(request_texts(flow), gateway.managed_keys) == []
        return
    assert call.principal == MANAGED_PRINCIPAL  # admitted, in managed mode
    provider = call.target.provider
    scheme, host, port = origin_of(upstream_base(provider))
    assert (flow.request.scheme, flow.request.host, flow.request.port) == (scheme, host, port)
    assert flow.request.headers.get_all("host") == [mitmproxy_url.hostport(scheme, host, port)]
    # Its own key, once, in its own header; no key anywhere else.
    header = KEY_HEADERS[provider.auth]
    assert call.key in managed_keys_of(provider)
    assert flow.request.headers.get_all(header) == [key_header_value(provider, call.key)]
    elsewhere = [text for text in request_texts(flow) if not text.lower().startswith(f"{header}: ")]
    assert keys_in(elsewhere, gateway.managed_keys) == []
    assert keys_in([flow.request.headers[header]], gateway.managed_keys) == [call.key]
    assert keys_in(request_texts(flow), [FORWARD_TOKEN]) == []  # the token never goes upstream


@examples(300)
@given(sent=gateway_requests())
def test_a_managed_key_only_goes_to_its_own_provider(gateway, sent):
    flow = gateway.send(*sent)
    if flow.response is None:
        event("sent" if call_of(flow) else "not a gateway call")
        assert_sent_only_to_its_provider(gateway, flow)
    else:
        event(f"refused {flow.response.status_code}")
        assert keys_in(request_texts(flow) + [flow.response.text], gateway.managed_keys) == []
        assert call_of(flow).key is None


# --- 6. bad input is a 4xx of SPEC §7, never the fail-closed 500 --------------------------------


@pytest.fixture(scope="module")
def built_in_gateway() -> Iterator[GatewayUnderTest]:
    with running_gateway() as gateway:
        yield gateway


@examples(100)
@example(sent=("/openai/é", [("authorization", f"Bearer {FORWARD_TOKEN}")]))
@given(sent=gateway_requests())
def test_bad_input_is_a_4xx_never_a_500(built_in_gateway, sent):
    flow = built_in_gateway.send(*sent)
    if flow.response is not None:
        assert flow.response.status_code in {400, 401, 403, 404}, flow.response.text
