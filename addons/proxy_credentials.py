"""Proxy credentials (`--set proxyauth=…`): mitmproxy's proxyauth answers a request without them
with an HTML 407. The gateway answers every error in the OpenAI shape, with its request id, and
audits it: this concern, first in the pipeline, reshapes that answer and keeps its challenge."""

from mitmproxy import http

from addons.calls import CALL, call_of, refuse
from meterproxy.call import Call
from meterproxy.errors import GatewayError
from meterproxy.ids import new_id

CHALLENGES = ("proxy-authenticate", "www-authenticate")


class ProxyCredentials:
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._reshape(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._reshape(flow)

    @staticmethod
    def _reshape(flow: http.HTTPFlow) -> None:
        answer = flow.response
        if answer is None or answer.status_code not in (401, 407) or call_of(flow) is not None:
            return
        challenge = {name: answer.headers[name] for name in CHALLENGES if name in answer.headers}
        if not challenge:
            return  # not proxyauth's
        call = flow.metadata[CALL] = Call(new_id("req"), flow.request.method, proxied=True)
        call.target_host = flow.request.host
        message = "proxy authentication required: send Proxy-Authorization with the proxy's credentials"
        refuse(flow, call, GatewayError(answer.status_code, message, "proxy_auth_required", challenge))
