"""The forward token (SPEC §2): base64 of a JSON object naming who is calling and who pays."""

import base64
import binascii
import enum
import functools
import json
from typing import Annotated

import pydantic
from pydantic import BaseModel, ConfigDict, StringConstraints

from meterproxy.errors import GatewayError

MAX_TOKEN_LENGTH = 8192
# How providers' keys begin (OpenAI, Anthropic, DeepSeek: sk-; Google: AIza; xAI: xai-; Groq:
# gsk_), and the gateway's own secrets: sent where a forward token belongs, they get a hint.
PROVIDER_KEY_PREFIXES = ("sk-", "sk_", "AIza", "xai-", "gsk_")
GATEWAY_SECRET_PREFIXES = ("msk_", "csk_", "psk_")
MINT = "meterproxy token mint --secret-key msk_…"
Secret = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=1024)]


class KeyMode(str, enum.Enum):
    MANAGED = "managed"
    UNMANAGED = "unmanaged"


class ForwardToken(BaseModel):
    """Decoded token. Unknown fields are ignored, as Lava does; wrong types are refused."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    secret_key: Secret
    connection_secret: Secret | None = None
    product_secret: Secret | None = None
    provider_key: Secret | None = None

    @pydantic.model_validator(mode="after")
    def _one_of_three_modes(self) -> "ForwardToken":
        billed = (self.connection_secret is not None, self.product_secret is not None)
        if billed == (True, False) or billed == (False, True):
            raise ValueError("connection_secret and product_secret go together")
        if billed == (False, False) and self.provider_key is None:
            raise ValueError("a token without connection and product needs a provider_key")
        return self

    @property
    def key_mode(self) -> KeyMode:
        return KeyMode.UNMANAGED if self.provider_key else KeyMode.MANAGED

    @property
    def metering_only(self) -> bool:
        return self.connection_secret is None


def encode_token(**fields: str | None) -> str:
    """The inverse of `decode_token`, for the admin command and tests."""
    payload = {name: value for name, value in fields.items() if value is not None}
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


class NotAToken(GatewayError):
    """A credential that is no forward token at all: through the proxy, the client's own
    provider key. One that is a token, but a bad one, carries secrets: it is never passed on."""


@functools.lru_cache(maxsize=4096)
def decode_token(raw: str) -> ForwardToken:
    """Standard or URL-safe base64, padding optional. Any defect is a 401 that names no secret.
    Tokens are immutable and the same few come on every call: the decoded ones are kept."""
    raw = raw.strip()
    if not raw:
        raise _invalid("no forward token", NotAToken)
    if len(raw) > MAX_TOKEN_LENGTH:
        raise _invalid("forward token is too long", NotAToken)
    try:
        padded = raw + "=" * (-len(raw) % 4)
        decoded = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        data = json.loads(decoded)
    except (binascii.Error, ValueError, RecursionError):
        raise _invalid(_not_a_token(raw), NotAToken) from None
    if not isinstance(data, dict):
        raise _invalid("forward token must encode a JSON object", NotAToken)
    try:
        return ForwardToken.model_validate(data)
    except pydantic.ValidationError as error:
        reasons = "; ".join(_describe(item) for item in error.errors())
        raise _invalid(f"invalid forward token: {reasons}") from None


def _not_a_token(raw: str) -> str:
    """What to do instead, for the credentials people send by mistake (never echoed)."""
    if raw.startswith(PROVIDER_KEY_PREFIXES):
        return (
            "this looks like a provider key, not a forward token: mint a forward token"
            f" ({MINT} --connection-secret csk_… --product-secret psk_…, or with --provider-key to use"
            " your own key) and send that"
        )
    if raw.startswith(GATEWAY_SECRET_PREFIXES):
        return f"this is one of the gateway's secrets, not a forward token: mint a forward token from them ({MINT} …)"
    return "forward token is not base64-encoded JSON"


def bearer(header_value: str | None) -> str | None:
    """The credential of an `Authorization: Bearer …` header, or None."""
    if not header_value:
        return None
    scheme, _, credential = header_value.strip().partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None


def _describe(item: dict) -> str:
    where = ".".join(str(part) for part in item["loc"])
    # Never echo the input: it may be a secret.
    return f"{where}: {item['msg']}" if where else item["msg"]


def _invalid(message: str, kind: type[GatewayError] = GatewayError) -> GatewayError:
    return kind(401, message, "invalid_token")
