"""Prometheus metrics at `/metrics` on the gateway's own port (exposition format).

Protected: with `METERPROXY_METRICS_TOKEN` in the environment a scrape must send it as a bearer
token; without it only loopback clients are answered. Counting costs the request path one
histogram observation (the gateway's own time before forwarding); the rest is counted once a
row has committed (`Ledger.settled`), after the client has its answer.
"""

import hmac
import ipaddress
import os
import time

from mitmproxy import http

from addons.calls import answer, call_of, own_path
from addons.ledger import IN_FLIGHT, Ledger
from meterproxy.errors import GatewayError
from meterproxy.metrics import GatewayMetrics
from meterproxy.token import bearer

PATH = "/metrics"
TOKEN_ENV = "METERPROXY_METRICS_TOKEN"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.metrics = GatewayMetrics()
        self.metrics.watch(lambda: ledger.writer.queued if ledger.writer else 0, lambda: len(IN_FLIGHT))
        ledger.settled.append(self.metrics.record)
        ledger.refused.append(lambda refusal: self.metrics.refusals.labels(refusal.status, refusal.code).inc())

    def running(self):
        if self.ledger.writer is not None:
            self.ledger.writer.committed = self.metrics.commits.observe

    def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is not None:
            if call.opened and flow.response is None:  # admitted, about to go upstream
                self.metrics.added.observe(max(0.0, time.time() - flow.request.timestamp_end))
            return
        if own_path(flow) != PATH:
            return
        refusal = self._refusal(flow)
        if refusal is not None:
            answer(flow, refusal)
            return
        flow.request.headers.pop("authorization", None)  # the flow may be kept (mitmweb)
        flow.response = http.Response.make(200, self.metrics.exposition(), {"content-type": CONTENT_TYPE})

    @staticmethod
    def _refusal(flow: http.HTTPFlow) -> GatewayError | None:
        token = os.environ.get(TOKEN_ENV)
        if token:
            given = bearer(flow.request.headers.get("authorization")) or ""
            if hmac.compare_digest(given.encode(), token.encode()):
                return None
            return GatewayError(401, f"send the metrics token ({TOKEN_ENV}) as a bearer token", "invalid_metrics_token")
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        address = ipaddress.ip_address(peer.removeprefix("::ffff:")) if peer else None
        if address is not None and address.is_loopback:
            return None
        return GatewayError(403, f"metrics are for loopback clients, or set {TOKEN_ENV}", "metrics_refused")
