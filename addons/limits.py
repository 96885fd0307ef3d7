"""The gateway's own limits: a maximum request body (413) and each connection's requests and
tokens per minute from its product (429 with Retry-After and OpenAI's x-ratelimit-* headers).
The rate limit is checked in the ledger's admission (it needs the product); either refusal
comes before the pending row, so it is audited and never charged."""

from datetime import datetime

from mitmproxy import ctx, http

from addons.calls import call_of, fail_closed, refuse
from meterproxy.call import Call
from meterproxy.errors import GatewayError
from meterproxy.store import Store

BYTES_PER_TOKEN = 4  # the usual estimate for a prompt's size in tokens


def limit_rate(store: Store, call: Call, body_size: int, now: datetime) -> int | None:
    """Judge the call against its connection's limits, counted over every gateway's admissions
    (in the admission's transaction); GatewayError 429 when over. The tokens its row counts
    against the limits, None when the connection has none."""
    limits = call.principal.limits
    if limits is None or not limits.active:
        return None
    worst = call.dialect.worst_case(call.request_body or {}, body_size // BYTES_PER_TOKEN) if call.dialect else None
    tokens = worst.input_tokens + worst.output_tokens if worst else body_size // BYTES_PER_TOKEN
    verdict = store.rate_window(call.principal.connection_id, now).verdict(limits, tokens, now.timestamp())
    call.rate_headers = verdict.headers
    if not verdict.allowed:
        message = "rate limit of this connection reached: retry after the Retry-After seconds"
        raise GatewayError(429, message, "rate_limit_exceeded", verdict.headers)
    return tokens


class Limits:
    max_body = 0

    def load(self, loader):
        loader.add_option("meterproxy_max_body", int, 32 * 1024 * 1024, "Largest request body in bytes (413 beyond).")

    def configure(self, updated):
        if "meterproxy_max_body" in updated:
            self.max_body = ctx.options.meterproxy_max_body

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal:
            return
        length = flow.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            refuse(flow, call, self._too_large())

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal:
            return
        if len(flow.request.raw_content or b"") > self.max_body:  # chunked: no length up front
            refuse(flow, call, self._too_large())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is not None and call.rate_headers and not call.refusal:
            flow.response.headers.update(call.rate_headers)

    def _too_large(self) -> GatewayError:
        return GatewayError(413, f"request body is larger than {self.max_body} bytes", "request_too_large")
