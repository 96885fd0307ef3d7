"""Authentication and keys: the forward token comes off the request, the provider key goes on.

The token is decoded at `requestheaders` (a bad one is a 401 before the body is read), its
secrets are checked against the database at `request`, and the key sent upstream is the
gateway's managed key for that provider or the customer's own (BYOK). A managed key is only
ever sent to its own provider: the target was resolved from the registry, never from input.
"""

import os

from mitmproxy import http

from addons.calls import call_of, fail_closed, refuse
from meterproxy.errors import GatewayError
from meterproxy.providers import AuthStyle, Provider
from meterproxy.store import Principal
from meterproxy.token import KeyMode, NotAToken, bearer, decode_token

REDACTED = "<redacted by meterproxy>"
KEY_HEADERS = {
    AuthStyle.BEARER: "authorization",
    AuthStyle.X_API_KEY: "x-api-key",
    AuthStyle.X_GOOG_API_KEY: "x-goog-api-key",
}


def put_key(headers, provider: Provider, key: str) -> None:
    """The key in the provider's own header style."""
    style = provider.auth
    headers[KEY_HEADERS[style]] = f"Bearer {key}" if style is AuthStyle.BEARER else key


class ManagedKeys:
    """The gateway's own provider keys, from the environment; several comma-separated keys
    are used in turn."""

    def __init__(self, environ=os.environ):
        self.environ = environ
        self._turns: dict[str, int] = {}

    def next_key(self, provider: Provider) -> str | None:
        keys = [key.strip() for key in self.environ.get(provider.key_env, "").split(",") if key.strip()]
        if not keys:
            return None
        turn = self._turns.get(provider.name, 0)
        self._turns[provider.name] = turn + 1
        return keys[turn % len(keys)]


CREDENTIAL_FIELDS = tuple(name.encode() for name in KEY_HEADERS.values())


def find_credential(request: http.Request) -> tuple[str | None, tuple]:
    """The key where an SDK puts it: the `Authorization` bearer, `x-api-key` (Anthropic),
    `x-goog-api-key` or `?key=` (Google); and the header fields without any credential. One
    pass over the raw header fields."""
    found: dict[bytes, str] = {}
    kept = []
    for name, value in request.headers.fields:
        lowered = name.lower()
        if lowered in CREDENTIAL_FIELDS:
            found.setdefault(lowered, value.decode("utf-8", "surrogateescape"))
        else:
            kept.append((name, value))
    candidates = [bearer(found.get(b"authorization")), found.get(b"x-api-key"), found.get(b"x-goog-api-key")]
    if _has_key_parameter(request):
        candidates.append(request.query.get("key"))
    return next((credential for credential in candidates if credential), None), tuple(kept)


def remove_credentials(request: http.Request, without: tuple) -> None:
    """Leave only `without`, the header fields `find_credential` kept, and no `?key=`."""
    if len(without) != len(request.headers.fields):
        request.headers.fields = without
    if _has_key_parameter(request):
        request.query.pop("key", None)


def _has_key_parameter(request: http.Request) -> bool:
    """Cheaper than parsing the query of every request."""
    return "key=" in request.path


def _scrub_headers(response: http.Response, key: bytes) -> None:
    fields = response.headers.fields
    if any(key in value for _, value in fields):
        response.headers.fields = tuple((name, value.replace(key, REDACTED.encode())) for name, value in fields)


class Auth:
    def __init__(self) -> None:
        self.managed_keys = ManagedKeys()

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal:
            return
        credential, without = find_credential(flow.request)
        try:
            call.token = decode_token(credential or "")
        except GatewayError as error:
            if call.proxied and isinstance(error, NotAToken):  # the client's own provider key: charged to nobody
                call.principal = Principal(merchant_id=None)
                call.key = credential
                return
            refuse(flow, call, error)
        remove_credentials(flow.request, without)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        """The key goes on here; the token's secrets are checked by the ledger's admission, in
        the same transaction as the hold and the pending row."""
        call = call_of(flow)
        if call is None or call.refusal or call.token is None:
            return
        try:
            key = self._key_for(call.target.provider, call.token)
        except GatewayError as error:
            refuse(flow, call, error)
            return
        call.key = key
        put_key(flow.request.headers, call.target.provider, key)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        call = call_of(flow)
        if call is not None and call.key:
            _scrub_headers(flow.response, call.key.encode())

    def response(self, flow: http.HTTPFlow) -> None:
        """A provider's answer may quote the key it was given: never pass that on or record it.
        Errors are read whole for this (`Metering`); a retried answer's headers are new here."""
        call = call_of(flow)
        if call is None or not call.key:
            return
        key = call.key.encode()
        if call.attempts > 1:
            _scrub_headers(flow.response, key)
        if flow.response.stream or flow.response.status_code < 400:
            return
        content = flow.response.content or b""
        if key in content:
            flow.response.content = content.replace(key, REDACTED.encode())

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def _key_for(self, provider: Provider, token) -> str:
        if token.key_mode is KeyMode.UNMANAGED:
            return token.provider_key
        key = self.managed_keys.next_key(provider)
        if key is None:
            raise GatewayError(403, f"no managed key for {provider.name}: send your own provider_key", "no_managed_key")
        return key

    @staticmethod
    def _redact(flow: http.HTTPFlow) -> None:
        """The flow outlives the request (mitmweb shows it): keep no key on it, the gateway's
        or the client's own."""
        if call_of(flow) is None:
            return
        fields = flow.request.headers.fields
        if any(name.lower() in CREDENTIAL_FIELDS for name, _ in fields):
            flow.request.headers.fields = tuple(
                (name, REDACTED.encode() if name.lower() in CREDENTIAL_FIELDS else value) for name, value in fields
            )
        if _has_key_parameter(flow.request) and "key" in flow.request.query:
            flow.request.query["key"] = REDACTED
