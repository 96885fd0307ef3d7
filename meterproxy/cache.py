"""The response cache's rules, as plain functions: which requests are the same question, and
what a request's headers and query say about reading and writing the cache."""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_TTL = 24 * 3600
OPT_IN_HEADER = "x-meterproxy-cache"  # "on" asks for the cache on a product that has it off
TTL_HEADER = "x-meterproxy-cache-ttl"  # seconds, for this request's entry


def cache_key(merchant_id: str, provider: str, endpoint: str, body: dict) -> str:
    """SHA-256 of who asks (one merchant never sees another's answers), where, and the canonical
    body: key order and whitespace do not matter; the token and metadata are not in the body."""
    canonical = json.dumps([merchant_id, provider, endpoint, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Directive:
    read: bool
    write: bool
    ttl: int


def directive(product_ttl: int, headers: Mapping[str, str], fresh: bool) -> Directive | None:
    """None when the cache is not in play for this request (`x-meterproxy-cache: bypass`, or a
    product without cache and no opt-in). `no-store` neither reads nor writes; `no-cache` and
    `?fresh=1` skip the lookup and refresh the entry. `headers` looks names up as HTTP does,
    whatever their case (mitmproxy's Headers)."""
    asked = headers.get(OPT_IN_HEADER, "").strip().lower()
    if asked in ("off", "bypass") or (not product_ttl and asked != "on"):
        return None
    control = {part.strip().lower() for part in headers.get("cache-control", "").split(",")}
    if "no-store" in control:
        return Directive(read=False, write=False, ttl=0)
    ttl = _seconds(headers.get(TTL_HEADER)) or product_ttl or DEFAULT_TTL
    return Directive(read=not (fresh or "no-cache" in control), write=True, ttl=ttl)


def _seconds(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() and int(value) > 0 else None
