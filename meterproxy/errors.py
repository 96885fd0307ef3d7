"""Errors the gateway answers itself, in the OpenAI error shape every SDK parses (SPEC §7)."""

import json
from dataclasses import dataclass, field

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_funds",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    407: "authentication_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "gateway_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


@dataclass
class GatewayError(Exception):
    """A refusal with its HTTP status; `code` is a stable machine-readable reason."""

    status: int
    message: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "gateway_error")

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        return json.dumps({"error": error}).encode()


def ledger_unavailable() -> GatewayError:
    """The ledger's database takes no writes (locked for long, full, failing): nothing that it
    cannot record goes ahead, and clients try again (SDKs do so by themselves on a 503)."""
    return GatewayError(503, "the ledger cannot record calls now", "ledger_unavailable", {"retry-after": "1"})
