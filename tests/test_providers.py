"""The provider registry and forward targets (SPEC §1.1, §1.2, §4): only exact provider URLs pass."""

import pytest

from meterproxy.errors import GatewayError
from meterproxy.providers import BUILT_IN, AuthStyle, Registry, Wire, forward_path, forward_target, target_host

OPENAI = "https://api.openai.com"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def registry():
    return Registry()


def refusal(registry: Registry, url: str) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        registry.resolve(url)
    return caught.value


def write_providers(tmp_path, text: str) -> Registry:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return Registry.from_file(path)


# --- resolve: accepted ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, provider, canonical",
    [
        (OPENAI + CHAT, "openai", OPENAI + CHAT),
        (OPENAI + CHAT + "?stream=true&n=2", "openai", OPENAI + CHAT + "?stream=true&n=2"),
        ("https://API.OpenAI.COM" + CHAT, "openai", OPENAI + CHAT),
        ("HTTPS://api.openai.com" + CHAT, "openai", OPENAI + CHAT),
        ("https://api.openai.com:443" + CHAT, "openai", OPENAI + CHAT),
        ("https://api.openai.com", "openai", OPENAI + "/"),
        ("https://api.openai.com?x=1", "openai", OPENAI + "/?x=1"),
        ("https://api.anthropic.com/v1/messages", "anthropic", "https://api.anthropic.com/v1/messages"),
        (
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            "google",
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
        ),
        ("https://api.mistral.ai/v1/chat/completions", "mistral", "https://api.mistral.ai/v1/chat/completions"),
        ("https://api.deepseek.com/chat/completions", "deepseek", "https://api.deepseek.com/chat/completions"),
        ("https://api.x.ai/v1/chat/completions", "xai", "https://api.x.ai/v1/chat/completions"),
    ],
)
def test_exact_provider_urls_resolve_to_a_canonical_target(registry, url, provider, canonical):
    target = registry.resolve(url)
    assert target.provider.name == provider
    assert target.url == canonical
    assert target.upstream_url == canonical  # no override in the built-in registry


def test_built_in_providers_use_their_own_key_header(registry):
    styles = {name: registry.by_name[name].auth for name in registry.by_name}
    assert styles == {
        "openai": AuthStyle.BEARER,
        "anthropic": AuthStyle.X_API_KEY,
        "google": AuthStyle.X_GOOG_API_KEY,
        "mistral": AuthStyle.BEARER,
        "deepseek": AuthStyle.BEARER,
        "xai": AuthStyle.BEARER,
    }


# --- resolve: refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example" + CHAT,
        "https://openai.com" + CHAT,
        "https://api.openai.com.evil.example" + CHAT,
        "https://evil-api.openai.com" + CHAT,
        "https://api.openai.com@evil.example" + CHAT,
        "https://api.openai.com:443@evil.example" + CHAT,
        "https://user@api.openai.com" + CHAT,
        "https://user:pass@api.openai.com" + CHAT,
        "https://@api.openai.com" + CHAT,
        "https://127.0.0.1" + CHAT,
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]" + CHAT,
        "https://[::ffff:127.0.0.1]" + CHAT,
        "https://2130706433" + CHAT,
        "https://0x7f000001" + CHAT,
        "http://api.openai.com" + CHAT,
        "http://api.openai.com:443" + CHAT,
        "https://api.openai.com:8443" + CHAT,
        "https://api.openai.com:80" + CHAT,
        "https://api.openai.com." + CHAT,
    ],
)
def test_anything_but_a_registered_origin_is_403(registry, url):
    error = refusal(registry, url)
    assert (error.status, error.code, error.type) == (403, "provider_not_allowed", "permission_error")


def test_a_403_names_the_host_but_never_the_userinfo(registry):
    error = refusal(registry, "https://alice:hunter2@api.openai.com" + CHAT)
    assert error.message == "api.openai.com is not a registered provider"
    assert "hunter2" not in error.body().decode()


def test_port_zero_is_not_the_default_port(registry):
    assert refusal(registry, "https://api.openai.com:0" + CHAT).status == 403


@pytest.mark.parametrize(
    "url, code",
    [
        ("", "missing_target"),
        (CHAT, "malformed_target"),
        ("api.openai.com" + CHAT, "malformed_target"),
        ("//api.openai.com" + CHAT, "malformed_target"),
        ("ftp://api.openai.com" + CHAT, "malformed_target"),
        ("https:///v1/chat", "malformed_target"),
        ("https://api.openai.com" + CHAT + "\r\nHost: evil.example", "malformed_target"),
        ("https://api.openai.com/v1/chat completions", "malformed_target"),
        ("https://api.openai.com/v1/chat\tcompletions", "malformed_target"),
        ("https://api.openai.com/v1/chat\x00", "malformed_target"),
        ("https://api.openai.com/v1/chat\x7f", "malformed_target"),
        (" https://api.openai.com" + CHAT, "malformed_target"),
        ("https://api.openai.com\\@evil.example/v1", "malformed_target"),
        ("https://api.openai.com/v1\\..\\admin", "malformed_target"),
        ("https://api.openai.com" + CHAT + "#frag", "malformed_target"),
        ("https://api.openai.com/v1/../admin", "malformed_target"),
        ("https://api.openai.com/v1/./chat", "malformed_target"),
        ("https://api.openai.com/v1/chat/..", "malformed_target"),
        ("https://api.openai.com/v1/%2e%2e/admin", "malformed_target"),
        ("https://api.openai.com/v1/%2E%2E/admin", "malformed_target"),
        ("https://api.openai.com/v1/.%2e/admin", "malformed_target"),
        ("https://api.openai.com/v1/..%2fadmin", "malformed_target"),
        ("https://api.openai.com:99999" + CHAT, "malformed_target"),
        ("https://api.openai.com:port" + CHAT, "malformed_target"),
        ("https://[::1" + CHAT, "malformed_target"),
    ],
)
def test_malformed_targets_are_400(registry, url, code):
    error = refusal(registry, url)
    assert (error.status, error.code, error.type) == (400, code, "invalid_request_error")


@pytest.mark.parametrize("path", ["/v1/files/file..abc", "/v1/.well/x", "/v1/%252e%252e/x"])
def test_dots_that_are_not_dot_segments_pass(registry, path):
    assert registry.resolve(OPENAI + path).url == OPENAI + path


# --- route (/<provider>/<path>) ---------------------------------------------------------------


def test_route_is_the_provider_base_plus_path(registry):
    target = registry.route("openai", "/v1/chat/completions?stream=true")
    assert target.provider.name == "openai"
    assert target.url == "https://api.openai.com/v1/chat/completions?stream=true"


def test_route_to_an_unknown_provider_is_404(registry):
    with pytest.raises(GatewayError) as caught:
        registry.route("nope", CHAT)
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        404,
        "unknown_provider",
        "no provider named 'nope'",
    )


def test_route_checks_the_path_like_resolve(registry):
    with pytest.raises(GatewayError) as caught:
        registry.route("openai", "/v1/../admin")
    assert caught.value.status == 400


# --- the providers file -----------------------------------------------------------------------


def test_no_file_is_the_built_in_registry():
    assert list(Registry.from_file(None).by_name.values()) == list(BUILT_IN)


def test_file_overrides_the_upstream_of_a_built_in(tmp_path):
    registry = write_providers(tmp_path, '[providers.openai]\nupstream = "http://127.0.0.1:9911/openai/"\n')

    target = registry.resolve(OPENAI + CHAT + "?a=1")

    assert target.url == OPENAI + CHAT + "?a=1"
    assert target.upstream_url == "http://127.0.0.1:9911/openai" + CHAT + "?a=1"
    openai = target.provider
    assert (openai.base_url, openai.key_env, openai.auth, openai.wire, openai.price_provider) == (
        OPENAI,
        "OPENAI_API_KEY",
        AuthStyle.BEARER,
        Wire.OPENAI,
        "openai",
    )
    # the other built-ins are still there, unchanged
    assert registry.by_name["anthropic"] == Registry().by_name["anthropic"]


def test_file_adds_an_openai_compatible_provider_with_defaults(tmp_path):
    registry = write_providers(tmp_path, '[providers.vllm]\nbase_url = "http://localhost:8000/"\n')

    target = registry.resolve("http://localhost:8000/v1/chat/completions")

    vllm = target.provider
    assert (vllm.name, vllm.base_url, vllm.key_env, vllm.auth, vllm.wire, vllm.price_provider, vllm.upstream) == (
        "vllm",
        "http://localhost:8000",
        "VLLM_API_KEY",
        AuthStyle.BEARER,
        Wire.OPENAI,
        "vllm",
        None,
    )
    assert target.url == target.upstream_url == "http://localhost:8000/v1/chat/completions"
    assert registry.route("vllm", "/v1/models").url == "http://localhost:8000/v1/models"
    # its origin is exact: another scheme or port is still refused
    assert refusal(registry, "https://localhost:8000/v1/models").status == 403
    assert refusal(registry, "http://localhost/v1/models").status == 403


def test_file_fields_of_a_new_provider_are_used(tmp_path):
    registry = write_providers(
        tmp_path,
        '[providers.selfhosted]\nbase_url = "https://llm.selfhosted.test"\n'
        'upstream = "http://127.0.0.1:9911/openai"\nkey_env = "SELF_KEY"\nprice_provider = "openai"\n'
        'auth = "x-api-key"\n',
    )
    selfhosted = registry.by_name["selfhosted"]
    assert (selfhosted.key_env, selfhosted.price_provider, selfhosted.auth) == (
        "SELF_KEY",
        "openai",
        AuthStyle.X_API_KEY,
    )
    assert registry.resolve("https://llm.selfhosted.test/v1/x").upstream_url == "http://127.0.0.1:9911/openai/v1/x"


@pytest.mark.parametrize(
    "text, mentions",
    [
        ("[providers.openai\nupstream = 1", "providers file"),
        ('[providers.openai]\nupstreams = "http://127.0.0.1:1"\n', "upstreams"),
        ('[provider.openai]\nupstream = "http://127.0.0.1:1"\n', "provider"),
        ('[providers.openai]\nauth = "basic"\n', "auth"),
        ('[providers.vllm]\nkey_env = "VLLM_KEY"\n', "needs a base_url"),
        ('[providers.vllm]\nbase_url = "http://localhost:8000/v1"\n', "scheme and host only"),
        ('[providers.vllm]\nbase_url = "http://localhost:8000/?x=1"\n', "scheme and host only"),
        ('[providers.vllm]\nbase_url = "ftp://localhost:8000"\n', "scheme and host only"),
        ('[providers.openai]\nbase_url = "https://api.openai.com/v1"\n', "scheme and host only"),
        # Google's key is GEMINI_API_KEY: a new provider named gemini would get it by default.
        ('[providers.gemini]\nbase_url = "http://gpu-box.internal:8000"\n', "share the managed key GEMINI_API_KEY"),
        ('[providers.openai]\nkey_env = "XAI_API_KEY"\n', "would share the managed key XAI_API_KEY"),
    ],
)
def test_an_invalid_providers_file_is_a_value_error(tmp_path, text, mentions):
    with pytest.raises(ValueError) as caught:
        write_providers(tmp_path, text)
    assert mentions in str(caught.value)


@pytest.mark.parametrize(
    "name, guess",
    [
        ("gemini", " (did you mean google?)"),
        ("opnai", " (did you mean openai?)"),
        ("Claude", " (did you mean anthropic?)"),
        ("vllm", ""),
    ],
)
def test_an_unknown_provider_id_is_one_line_naming_the_valid_ones(tmp_path, name, guess):
    with pytest.raises(ValueError) as caught:
        write_providers(tmp_path, f'[providers.{name}]\nupstream = "http://127.0.0.1:1"\n')
    assert str(caught.value).endswith(
        f"no built-in provider {name!r}{guess}: the built-in providers are openai, anthropic, google, mistral,"
        " deepseek, xai; a table for a new provider needs a base_url"
    )
    assert "\n" not in str(caught.value)


def test_a_missing_providers_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="providers file"):
        Registry.from_file(tmp_path / "absent.toml")


# --- forward_target -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, target, params",
    [
        (
            "u=https%3A%2F%2Fapi.openai.com%2Fv1%2Fchat%2Fcompletions",
            "https://api.openai.com/v1/chat/completions",
            {},
        ),
        (
            "u=HTTPS%3A%2F%2Fapi.openai.com%2Fv1%2Fmodels%3Flimit%3D2",
            "HTTPS://api.openai.com/v1/models?limit=2",
            {},
        ),
        ("u=https://api.openai.com/v1/chat/completions", "https://api.openai.com/v1/chat/completions", {}),
        (
            "u=https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse&key=1",
            "https://generativelanguage.googleapis.com/v1beta/models/g:streamGenerateContent?alt=sse&key=1",
            {},
        ),
        (
            "metadata=%7B%22user%22%3A%22u1%22%7D&u=https://x/y?alt=sse&key=1",
            "https://x/y?alt=sse&key=1",
            {"metadata": '{"user":"u1"}'},
        ),
        (
            "u=https://api.openai.com/v1/chat/completions&metadata=%7B%22a%22%3A%22b%22%7D",
            "https://api.openai.com/v1/chat/completions",
            {"metadata": '{"a":"b"}'},
        ),
        (
            "metadata=%7B%22a%22%3A%22b+c%22%7D&u=https%3A%2F%2Fapi.openai.com%2Fv1%2Fmodels",
            "https://api.openai.com/v1/models",
            {"metadata": '{"a":"b c"}'},
        ),
        ("metadata=x", "", {"metadata": "x"}),
        ("", "", {}),
    ],
    ids=[
        "percent-encoded",
        "percent-encoded-with-query",
        "raw",
        "raw-with-own-query-last",
        "metadata-before-raw-u-with-query",
        "metadata-after-raw-u",
        "metadata-before-encoded-u",
        "no-u",
        "empty",
    ],
)
def test_forward_target(query, target, params):
    assert forward_target(query) == (target, params)


OPENAI_CHAT = "https://api.openai.com/v1/chat/completions"


@pytest.mark.parametrize(
    "path, query, target, params",
    [
        ("chat/completions", "u=https%3A%2F%2Fapi.openai.com%2Fv1%2F", OPENAI_CHAT, {}),
        ("chat/completions", "u=https://api.openai.com/v1", OPENAI_CHAT, {}),
        (
            "v1/messages",
            "u=https%3A%2F%2Fapi.anthropic.com&beta=true&metadata=%7B%22a%22%3A%22b%22%7D&fresh=1",
            "https://api.anthropic.com/v1/messages?beta=true",
            {"metadata": '{"a":"b"}', "fresh": "1"},
        ),
        (
            "models/m:streamGenerateContent",
            "u=https://g.example/v1beta/?alt=sse",
            "https://g.example/v1beta/models/m:streamGenerateContent?alt=sse",
            {},
        ),
        ("chat/completions", "", "", {}),  # no u: still "missing target URL"
        ("../admin", "u=https://api.openai.com/v1/", "https://api.openai.com/v1/../admin", {}),  # resolve refuses it
    ],
)
def test_a_forward_path_is_joined_onto_u(path, query, target, params):
    """`/v1/forward/<path>?u=<base>` is `<base><path>`, with one slash between them."""
    assert forward_target(query, path) == (target, params)


@pytest.mark.parametrize(
    "path, joined",
    [
        ("/v1/forward", ""),
        ("/v1/forward/", ""),
        ("/v1/forward/chat/completions", "chat/completions"),
        ("/v1/forwarder", None),
        ("/openai/v1", None),
    ],
)
def test_forward_path(path, joined):
    assert forward_path(path) == joined


def test_a_raw_u_keeps_its_own_key_parameter_inside_u():
    url, params = forward_target("u=https://x/y?alt=sse&key=1")
    assert url.endswith("?alt=sse&key=1")
    assert "key" not in params


@pytest.mark.parametrize(
    "url, host",
    [
        ("https://api.openai.com/v1/x?key=secret", "api.openai.com"),
        ("https://alice:hunter2@Evil.Example:8443/x", "evil.example"),
        ("https://api.openai.com@evil.example/x", "evil.example"),
        ("https://[::1]:443/x", "::1"),
        ("/v1/chat", None),
        ("", None),
        ("https://[::1/x", None),
    ],
)
def test_target_host(url, host):
    assert target_host(url) == host
