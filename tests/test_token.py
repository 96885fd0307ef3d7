"""The forward token (SPEC §2): decoding, the three key modes, and refusals that name no secret."""

import base64
import json

import pydantic
import pytest

from meterproxy.errors import GatewayError
from meterproxy.token import MAX_TOKEN_LENGTH, ForwardToken, KeyMode, bearer, decode_token, encode_token

SECRET_KEY = "msk_TOPSECRET_merchant_9f1c"
CONNECTION = "csk_TOPSECRET_connection_4a7e"
PRODUCT = "psk_TOPSECRET_product_b3d0"
PROVIDER_KEY = "sk-TOPSECRET-byok-77e2"
SECRETS = (SECRET_KEY, CONNECTION, PRODUCT, PROVIDER_KEY)


def b64(payload: object) -> str:
    """Standard base64 (with padding) of a JSON payload, or of raw text/bytes."""
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    return base64.b64encode(payload).decode()


def refusal(raw: str) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        decode_token(raw)
    return caught.value


def assert_names_no_secret(error: GatewayError) -> None:
    shown = (str(error), error.message, error.body().decode(), repr(error.headers))
    for secret in SECRETS:
        assert not any(secret in text for text in shown), f"{secret} leaked into {shown}"


# --- decoding -------------------------------------------------------------------------------


def test_standard_base64_with_padding_decodes():
    raw = b64({"secret_key": SECRET_KEY, "connection_secret": CONNECTION, "product_secret": PRODUCT})

    token = decode_token(raw)

    assert token == ForwardToken(secret_key=SECRET_KEY, connection_secret=CONNECTION, product_secret=PRODUCT)
    assert token.provider_key is None


def test_url_safe_base64_decodes_to_the_same_token():
    # '?' and '~>' make the standard alphabet produce both '+' and '/'.
    payload = json.dumps({"secret_key": "msk_????~>", "provider_key": "sk-byok"}, separators=(",", ":")).encode()
    standard = base64.b64encode(payload).decode()
    url_safe = base64.urlsafe_b64encode(payload).decode()
    assert "+" in standard and "/" in standard and "-" in url_safe and "_" in url_safe

    assert decode_token(url_safe) == decode_token(standard)
    assert decode_token(url_safe).secret_key == "msk_????~>"


@pytest.mark.parametrize("padding", ["=", "=="])
def test_missing_padding_is_accepted(padding):
    for filler in ("a", "ab", "abc"):
        raw = b64({"secret_key": SECRET_KEY + filler, "provider_key": PROVIDER_KEY})
        if raw.endswith(padding) and not raw.endswith("=" + padding):
            break
    else:
        pytest.fail(f"no payload ends with exactly {padding!r}")

    token = decode_token(raw.rstrip("="))

    assert token.secret_key == SECRET_KEY + filler
    assert token.provider_key == PROVIDER_KEY


def test_surrounding_whitespace_is_ignored():
    raw = b64({"secret_key": SECRET_KEY, "provider_key": PROVIDER_KEY})
    assert decode_token(f"  {raw}\t\n").secret_key == SECRET_KEY


def test_unknown_fields_are_ignored():
    raw = b64({"secret_key": SECRET_KEY, "provider_key": PROVIDER_KEY, "future_field": {"x": 1}})
    assert decode_token(raw) == ForwardToken(secret_key=SECRET_KEY, provider_key=PROVIDER_KEY)


@pytest.mark.parametrize(
    "raw, message",
    [
        ("", "no forward token"),
        ("   ", "no forward token"),
        ("not base64!!", "forward token is not base64-encoded JSON"),
        ("a", "forward token is not base64-encoded JSON"),  # one char cannot be padded to base64
        (b64("hello, not json"), "forward token is not base64-encoded JSON"),
        (b64(b"\xff\xfe\x00 binary"), "forward token is not base64-encoded JSON"),
        (b64([SECRET_KEY]), "forward token must encode a JSON object"),
        (b64(f'"{SECRET_KEY}"'), "forward token must encode a JSON object"),
        (b64("null"), "forward token must encode a JSON object"),
        (b64("42"), "forward token must encode a JSON object"),
    ],
)
def test_undecodable_tokens_are_401_invalid_token(raw, message):
    error = refusal(raw)
    assert (error.status, error.code, error.message) == (401, "invalid_token", message)
    assert error.type == "authentication_error"
    assert_names_no_secret(error)


def test_a_token_over_max_length_is_refused_before_decoding():
    error = refusal("A" * (MAX_TOKEN_LENGTH + 1))
    assert (error.status, error.code, error.message) == (401, "invalid_token", "forward token is too long")


def test_a_valid_token_of_exactly_max_length_is_accepted():
    base = {"secret_key": SECRET_KEY, "provider_key": PROVIDER_KEY, "pad": ""}
    # base64 of n bytes (n a multiple of 3) is 4n/3 characters without padding
    filler = MAX_TOKEN_LENGTH * 3 // 4 - len(json.dumps(base).encode())
    raw = b64({**base, "pad": "x" * filler})
    assert len(raw) == MAX_TOKEN_LENGTH

    assert decode_token(raw).provider_key == PROVIDER_KEY


def test_deeply_nested_json_is_a_401_not_a_crash():
    raw = b64(b"[" * 3000 + b"]" * 3000)
    assert len(raw) <= MAX_TOKEN_LENGTH
    assert refusal(raw).status == 401


# --- fields and modes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"secret_key": 12345, "provider_key": PROVIDER_KEY}, "secret_key"),
        ({"secret_key": [SECRET_KEY], "provider_key": PROVIDER_KEY}, "secret_key"),
        ({"secret_key": {SECRET_KEY: 1}, "provider_key": PROVIDER_KEY}, "secret_key"),
        ({"secret_key": None, "provider_key": PROVIDER_KEY}, "secret_key"),
        ({"provider_key": PROVIDER_KEY}, "secret_key"),
        ({"secret_key": SECRET_KEY, "provider_key": True}, "provider_key"),
        ({"secret_key": SECRET_KEY, "provider_key": ""}, "provider_key"),
        ({"secret_key": SECRET_KEY, "provider_key": PROVIDER_KEY * 100}, "provider_key"),
        ({"secret_key": SECRET_KEY, "connection_secret": 7, "product_secret": PRODUCT}, "connection_secret"),
        ({"secret_key": SECRET_KEY, "connection_secret": CONNECTION, "product_secret": ""}, "product_secret"),
    ],
)
def test_wrong_field_types_are_401_naming_the_field_not_the_value(payload, field):
    error = refusal(b64(payload))
    assert (error.status, error.code) == (401, "invalid_token")
    assert error.message.startswith(f"invalid forward token: {field}: ")
    assert_names_no_secret(error)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (
            {"secret_key": SECRET_KEY, "connection_secret": CONNECTION},
            "connection_secret and product_secret go together",
        ),
        (
            {"secret_key": SECRET_KEY, "connection_secret": CONNECTION, "provider_key": PROVIDER_KEY},
            "connection_secret and product_secret go together",
        ),
        (
            {"secret_key": SECRET_KEY, "product_secret": PRODUCT},
            "connection_secret and product_secret go together",
        ),
        (
            {"secret_key": SECRET_KEY},
            "a token without connection and product needs a provider_key",
        ),
        (
            {"secret_key": SECRET_KEY, "connection_secret": None, "product_secret": None, "provider_key": None},
            "a token without connection and product needs a provider_key",
        ),
    ],
)
def test_invalid_mode_combinations_are_401(payload, reason):
    error = refusal(b64(payload))
    assert (error.status, error.code) == (401, "invalid_token")
    assert error.message == f"invalid forward token: Value error, {reason}"
    assert_names_no_secret(error)


@pytest.mark.parametrize(
    "fields, key_mode, metering_only",
    [
        ({"connection_secret": CONNECTION, "product_secret": PRODUCT}, KeyMode.MANAGED, False),
        (
            {"connection_secret": CONNECTION, "product_secret": PRODUCT, "provider_key": PROVIDER_KEY},
            KeyMode.UNMANAGED,
            False,
        ),
        ({"connection_secret": None, "product_secret": None, "provider_key": PROVIDER_KEY}, KeyMode.UNMANAGED, True),
    ],
    ids=["managed", "byok", "metering-only"],
)
def test_the_three_modes(fields, key_mode, metering_only):
    token = decode_token(b64({"secret_key": SECRET_KEY, **fields}))
    assert token.key_mode is key_mode
    assert token.metering_only is metering_only
    assert token.secret_key == SECRET_KEY


def test_a_decoded_token_is_immutable():
    token = decode_token(b64({"secret_key": SECRET_KEY, "provider_key": PROVIDER_KEY}))
    with pytest.raises(pydantic.ValidationError):
        token.provider_key = "sk-other"
    assert token.provider_key == PROVIDER_KEY


# --- encode_token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"secret_key": SECRET_KEY, "connection_secret": CONNECTION, "product_secret": PRODUCT},
        {
            "secret_key": SECRET_KEY,
            "connection_secret": CONNECTION,
            "product_secret": PRODUCT,
            "provider_key": PROVIDER_KEY,
        },
        {"secret_key": SECRET_KEY, "provider_key": PROVIDER_KEY},
    ],
    ids=["managed", "byok", "metering-only"],
)
def test_encode_token_round_trips(fields):
    token = decode_token(encode_token(**fields))
    assert token.model_dump(exclude_none=True) == fields


def test_encode_token_omits_none_fields_and_is_compact_standard_base64():
    raw = encode_token(secret_key=SECRET_KEY, connection_secret=None, product_secret=None, provider_key=PROVIDER_KEY)
    assert base64.b64decode(raw, validate=True) == (
        b'{"secret_key":"' + SECRET_KEY.encode() + b'","provider_key":"' + PROVIDER_KEY.encode() + b'"}'
    )


# --- bearer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, credential",
    [
        ("Bearer abc.def", "abc.def"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("  Bearer   abc  ", "abc"),
        ("Bearer", ""),
        ("Basic dXNlcjpwYXNz", None),
        ("Token abc", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer(header, credential):
    assert bearer(header) == credential
