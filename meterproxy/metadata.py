"""Request metadata (SPEC §7): a JSON object of at most 100 string pairs, from the query,
the `x-lava-metadata` header or one `x-lava-metadata-<key>` header per pair."""

import json
import re
from collections.abc import Iterable

from meterproxy.errors import GatewayError

MAX_PAIRS = 100
MAX_LENGTH = 255
HEADER = "x-lava-metadata"
_KEY = re.compile(r"[A-Za-z0-9_]{1,255}")


def parse_metadata(
    query_value: str | None, header_value: str | None, headers: Iterable[tuple[str, str]]
) -> dict[str, str]:
    """Merge the three sources (later ones win per key) and validate the result."""
    merged: dict[str, str] = {}
    for source, raw in (("query parameter metadata", query_value), (f"header {HEADER}", header_value)):
        if raw is not None:
            merged.update(_json_object(source, raw))
    prefix = HEADER + "-"
    for name, value in headers:
        if name.lower().startswith(prefix):
            merged[name[len(prefix) :]] = value
    return validate_metadata(merged)


def validate_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise _bad("metadata must be a JSON object")
    if len(metadata) > MAX_PAIRS:
        raise _bad(f"metadata has {len(metadata)} pairs; at most {MAX_PAIRS} are allowed")
    for key, value in metadata.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise _bad("metadata keys are 1-255 characters of ASCII letters, digits and '_'")
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_LENGTH:
            raise _bad(f"metadata value of {key!r} must be a string of 1-255 characters")
    return metadata


def _json_object(source: str, raw: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad(f"{source} is not valid JSON") from None
    if not isinstance(value, dict):
        raise _bad(f"{source} must be a JSON object")
    return value


def _bad(message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_metadata")
