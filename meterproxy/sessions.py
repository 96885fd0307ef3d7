"""Dashboard sessions: a signed cookie that says who signed in and until when.

The cookie holds no secret, only the viewer (a merchant's id, or `*` for the operator), its
expiry and a nonce, signed with HMAC-SHA256. The signing key comes from `METERPROXY_SESSION_KEY`
(so that every gateway process sharing a ledger accepts the same sessions, and sessions outlive
a restart) or is drawn at random when the gateway starts. Signing out ends the session in this
process (its nonce is refused until it would have expired) and clears the cookie.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass

COOKIE = "meterproxy_session"
KEY_ENV = "METERPROXY_SESSION_KEY"
OPERATOR = "*"


@dataclass(frozen=True)
class Viewer:
    merchant_id: str | None  # None: the operator, who sees every merchant
    expires: float
    nonce: str

    @property
    def operator(self) -> bool:
        return self.merchant_id is None


class Sessions:
    def __init__(self, key: bytes | None = None, lifetime: float = 8 * 3600) -> None:
        configured = os.environ.get(KEY_ENV)
        self.key = key or (configured.encode() if configured else secrets.token_bytes(32))
        self.lifetime = lifetime  # seconds
        self._ended: dict[str, float] = {}  # nonces signed out, with their expiry

    def start(self, merchant_id: str | None, now: float) -> str:
        """A new session's cookie value; `merchant_id` None for the operator."""
        claims = [merchant_id or OPERATOR, int(now + self.lifetime), secrets.token_urlsafe(12)]
        payload = _encode(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def viewer(self, cookie: str | None, now: float) -> Viewer | None:
        """Who the cookie names, or None: missing, forged, expired or signed out."""
        payload, _, signature = (cookie or "").partition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            merchant_id, expires, nonce = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return None
        if expires <= now or nonce in self._ended:
            return None
        return Viewer(None if merchant_id == OPERATOR else merchant_id, expires, nonce)

    def end(self, viewer: Viewer, now: float) -> None:
        self._ended = {nonce: expiry for nonce, expiry in self._ended.items() if expiry > now}
        self._ended[viewer.nonce] = viewer.expires

    def _sign(self, payload: str) -> str:
        return _encode(hmac.new(self.key, payload.encode(), hashlib.sha256).digest())


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
