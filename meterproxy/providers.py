"""The provider registry and the parsing of forward targets (SPEC §1.1, §1.2, §4).

A target URL is accepted only when its scheme, host and port are exactly those of a registered
provider: no userinfo, no lookalike or suffix hosts, no IP literals, no dot-segment paths. The
optional providers TOML file adds OpenAI-compatible providers and points any provider's upstream
at another base URL (how tests reach the local fake provider).
"""

import difflib
import enum
import functools
import re
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pydantic
from pydantic import BaseModel, ConfigDict

from meterproxy.errors import GatewayError


class AuthStyle(str, enum.Enum):
    """How a provider expects its key."""

    BEARER = "bearer"  # Authorization: Bearer <key>
    X_API_KEY = "x-api-key"  # Anthropic
    X_GOOG_API_KEY = "x-goog-api-key"  # Gemini


class Wire(str, enum.Enum):
    """Which wire format the provider speaks, hence how its usage is read."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GOOGLE = "google"


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str  # the public origin, e.g. https://api.openai.com
    key_env: str
    auth: AuthStyle
    wire: Wire
    price_provider: str  # the provider id in genai-prices
    upstream: str | None = None  # where calls really go, when overridden
    # OpenAI-compatible streams carry usage only when asked (`stream_options.include_usage`);
    # False for a provider that sends it unasked and refuses the option (Mistral, with a 422).
    stream_options: bool = True

    @property
    def origin(self) -> tuple[str, str, int]:
        return _origin(self.base_url)

    @property
    def upstream_origin(self) -> tuple[str, str, int]:
        return _origin(self.upstream or self.base_url)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port or _DEFAULT_PORTS[parts.scheme]


@dataclass(frozen=True)
class Target:
    """One accepted call: the provider, the URL as the client named it, where it really goes."""

    provider: Provider
    url: str
    upstream_url: str


BUILT_IN = (
    Provider("openai", "https://api.openai.com", "OPENAI_API_KEY", AuthStyle.BEARER, Wire.OPENAI, "openai"),
    Provider(
        "anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY", AuthStyle.X_API_KEY, Wire.ANTHROPIC, "anthropic"
    ),
    Provider(
        "google",
        "https://generativelanguage.googleapis.com",
        "GEMINI_API_KEY",
        AuthStyle.X_GOOG_API_KEY,
        Wire.GOOGLE,
        "google",
    ),
    Provider(
        "mistral",
        "https://api.mistral.ai",
        "MISTRAL_API_KEY",
        AuthStyle.BEARER,
        Wire.OPENAI,
        "mistral",
        stream_options=False,
    ),
    Provider("deepseek", "https://api.deepseek.com", "DEEPSEEK_API_KEY", AuthStyle.BEARER, Wire.OPENAI, "deepseek"),
    Provider("xai", "https://api.x.ai", "XAI_API_KEY", AuthStyle.BEARER, Wire.OPENAI, "x-ai"),
)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")
_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# A path whose version lost the slash after it (`/v1chat/completions`): a base URL without its
# trailing slash, joined by an SDK that adds none.
_VERSION = r"v\d+(?:beta\d*|alpha\d*)?"
_LOST_SLASH = re.compile(rf"^/(?!{_VERSION}(?:/|$))({_VERSION})[a-z]")


class ProviderEntry(BaseModel):
    """One `[providers.<name>]` table of the providers file."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None
    upstream: str | None = None
    key_env: str | None = None
    auth: AuthStyle = AuthStyle.BEARER
    wire: Wire = Wire.OPENAI
    price_provider: str | None = None
    stream_options: bool = True


class ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: dict[str, ProviderEntry] = {}


class Registry:
    """Providers by name and by origin; `resolve` is the only way a URL becomes a Target."""

    def __init__(self, providers: tuple[Provider, ...] | list[Provider] = BUILT_IN):
        self.by_name = {provider.name: provider for provider in providers}
        self.by_origin = {provider.origin: provider for provider in providers}
        # `host, port` pairs: where clients call providers, and where the gateway sends the calls
        # (the operator's overrides: a local model server, the tests' fake provider).
        self.provider_hosts = frozenset((host, port) for _, host, port in self.by_origin)
        self.upstream_hosts = frozenset((p.upstream_origin[1], p.upstream_origin[2]) for p in providers)
        # The same few URLs come again and again; a Target is immutable.
        self._resolved = functools.lru_cache(maxsize=4096)(self._resolve)

    @classmethod
    def from_file(cls, path: str | Path | None) -> "Registry":
        if not path:
            return cls()
        try:
            parsed = ProvidersFile.model_validate(tomllib.loads(Path(path).read_text()))
        except pydantic.ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
            raise ValueError(f"providers file {path}: {problems}") from None
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"providers file {path}: {error}") from None
        providers = {provider.name: provider for provider in BUILT_IN}
        for name, entry in parsed.providers.items():
            if name not in providers and not entry.base_url:
                raise ValueError(f"providers file {path}: {unknown_provider(name)}")
            providers[name] = _merge(name, entry, providers.get(name))
        owners: dict[str, str] = {}
        for provider in providers.values():  # a managed key goes only to its own provider
            owner = owners.setdefault(provider.key_env, provider.name)
            if owner != provider.name:
                raise ValueError(
                    f"providers file: {provider.name} and {owner} would share the managed key {provider.key_env}:"
                    f" give {provider.name} a key_env of its own"
                )
        return cls(list(providers.values()))

    def host_patterns(self) -> list[str]:
        """Regular expressions matching exactly the providers' `host:port`, as mitmproxy's
        allow_hosts takes them."""
        return sorted({f"^{re.escape(host)}:{port}$" for _, host, port in self.by_origin})

    def resolve(self, url: str) -> Target:
        """Accept `url` only if it names a registered provider exactly."""
        return self._resolved(url)

    def _resolve(self, url: str) -> Target:
        if not url:
            raise GatewayError(400, "missing target URL: pass ?u=<provider URL>", "missing_target")
        if _UNSAFE.search(url):
            raise GatewayError(400, "target URL contains whitespace or control characters", "malformed_target")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise GatewayError(400, "target URL is malformed", "malformed_target") from None
        if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
            raise GatewayError(400, "target URL must be an absolute http(s) URL", "malformed_target")
        if parts.fragment or _DOT_SEGMENT.search(urllib.parse.unquote(parts.path)):
            raise GatewayError(400, "target URL has a fragment or dot segments", "malformed_target")
        host = parts.hostname or ""
        origin = (parts.scheme, host, _DEFAULT_PORTS[parts.scheme] if port is None else port)
        provider = self.by_origin.get(origin)
        if provider is None or "@" in parts.netloc:
            secure = self.by_origin.get(("https", host, 443 if port in (None, 80) else port))
            if parts.scheme == "http" and secure is not None and "@" not in parts.netloc:
                raise GatewayError(
                    403,
                    f"{host} is called over https only: use {secure.base_url}{parts.path}",
                    "provider_not_allowed",
                )
            raise GatewayError(403, f"{host or 'target'} is not a registered provider", "provider_not_allowed")
        if lost := _LOST_SLASH.match(parts.path):
            raise GatewayError(
                400,
                f"the path {parts.path} lost the slash after /{lost[1]}: use the base URL /{provider.name}/{lost[1]}/"
                f" on the gateway, or u={provider.base_url}/{lost[1]}/",
                "malformed_target",
            )
        # Non-ASCII characters go on percent-encoded (as UTF-8), as every HTTP client sends them.
        path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
        query = urllib.parse.quote(parts.query, safe=_PATH_SAFE + "?")
        path_and_query = urllib.parse.urlunsplit(("", "", path, query, ""))
        canonical = provider.base_url + path_and_query
        return Target(provider, canonical, (provider.upstream or provider.base_url) + path_and_query)

    def route(self, name: str, path_and_query: str) -> Target:
        """`/<provider>/<path>` is `/v1/forward?u=<provider base>/<path>` (SPEC §1.2)."""
        provider = self.by_name.get(name)
        if provider is None:
            raise GatewayError(404, f"no provider named {name!r}", "unknown_provider")
        return self.resolve(provider.base_url + path_and_query)


# What people call providers whose ids are others.
_ALIASES = {"gemini": "google", "googleai": "google", "claude": "anthropic", "grok": "xai", "x-ai": "xai"}


def unknown_provider(name: str) -> str:
    """One line: the id is not a provider's (with the likely one), and the valid ids."""
    ids = [provider.name for provider in BUILT_IN]
    likely = _ALIASES.get(name.lower()) or next(iter(difflib.get_close_matches(name.lower(), ids, n=1)), None)
    guess = f" (did you mean {likely}?)" if likely else ""
    return (
        f"no built-in provider {name!r}{guess}: the built-in providers are {', '.join(ids)};"
        " a table for a new provider needs a base_url"
    )


def _merge(name: str, entry: ProviderEntry, known: Provider | None) -> Provider:
    if known is None:  # a new provider (from_file made sure it has a base_url)
        known = Provider(name, "", f"{name.upper()}_API_KEY", entry.auth, entry.wire, name)
    base_url = (entry.base_url or known.base_url).rstrip("/")
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path or parts.query:
        raise ValueError(f"providers file: {name}.base_url must be a scheme and host only")
    fields = entry.model_dump(exclude_unset=True, exclude={"base_url", "upstream"})
    upstream = entry.upstream.rstrip("/") if entry.upstream else known.upstream
    return Provider(**{**known.__dict__, **fields, "base_url": base_url, "upstream": upstream})


FORWARD = "/v1/forward"
GATEWAY_PARAMETERS = ("metadata", "fresh")  # the forward URL's own; any other is the target's


def forward_path(path: str) -> str | None:
    """For a forward endpoint's path, what follows `/v1/forward/` (often nothing); else None.
    SDKs that join their paths to a base URL carrying `?u=` put them there, before the query."""
    if path == FORWARD:
        return ""
    return path.removeprefix(FORWARD + "/") if path.startswith(FORWARD + "/") else None


def forward_target(query: str, path: str = "") -> tuple[str, dict[str, str]]:
    """Split a /v1/forward query into the target URL and the other parameters.

    `u` may be percent-encoded or raw; a raw `u` carrying its own query (`…?alt=sse&key=…`)
    is taken to run to the end of the string, so it must be the last parameter. `path` (what
    followed `/v1/forward/`) is joined onto `u`'s path, one slash between them, and then the
    parameters that are not the gateway's own are the target's, as the SDK that put them there meant.
    """
    target = ""
    params: dict[str, str] = {}
    theirs: list[str] = []
    rest = query
    while rest:
        field, sep, rest = rest.partition("&")
        name, _, value = field.partition("=")
        if name == "u":
            if "?" in value:  # a raw URL with its own query: everything that follows is its own
                target = value + sep + rest
                break
            target = urllib.parse.unquote(value) if value[:8].lower().startswith(("http%3a", "https%3a")) else value
        elif path and urllib.parse.unquote_plus(name) not in GATEWAY_PARAMETERS:
            theirs.append(field)
        elif name:
            params[urllib.parse.unquote_plus(name)] = urllib.parse.unquote_plus(value)
    if path and target:
        base, _, own_query = target.partition("?")
        target_query = "&".join(filter(None, (own_query, *theirs)))
        target = f"{base.rstrip('/')}/{path}" + (f"?{target_query}" if target_query else "")
    return target, params


# A provider's own path sent to the gateway without the provider's name (an SDK given the
# gateway's address alone as its base URL): the provider it belongs to, and its SDK's base path.
_BARE_PATHS = (("/v1/messages", "anthropic", ""), ("/v1beta/", "google", ""), ("/v1/", "openai", "/v1"))


def unknown_endpoint(path: str, gateway: str) -> GatewayError:
    """The 404 for a gateway path that names nothing it serves; for a provider's own path, the
    two base URLs that work (`gateway` is the gateway's own URL as the client named it)."""
    message = f"no such endpoint: {path}"
    for prefix, name, version in _BARE_PATHS:
        if path.startswith(prefix):
            base = next(provider.base_url for provider in BUILT_IN if provider.name == name)
            message += (
                f". The path names no provider: use the base URL {gateway}/{name}{version}"
                f" or {gateway}/v1/forward?u={base}{version}/"
            )
            break
    return GatewayError(404, message, "unknown_endpoint")


def target_host(url: str) -> str | None:
    """The host a URL names, best effort and never its userinfo, path or query (for the audit)."""
    try:
        return urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None
