"""Upstream failures answered in the OpenAI shape (SPEC §7, §9): a provider that hangs past the
first-byte timeout, drops the connection before answering, or cuts a body that is not streamed.

mitmproxy 12 answers those itself, with an HTML 502 page and without the request id, from
`HttpStream.handle_protocol_error`, and offers no hook that may replace that answer: the `error`
hook comes after the decision and cannot set a response. So this one method is wrapped, and only
here: while nothing has reached the client, a gateway call's failure becomes a response of the
gateway's own (504 `upstream_timeout` when its timeout cut the provider off, 502 `upstream_error`
otherwise) that takes mitmproxy's path for a response set by an addon: the `responseheaders` and
`response` hooks, then the client. Retries (a non-streamed call that got nothing is retried like
a 5xx), metering and the ledger see it as they see any answer. `tests/test_failures.py` fails
when mitmproxy changes the wrapped method, so that the wrapper is reviewed again.
"""

import time

from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpStream, ResponseProtocolError
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook

from addons.calls import REQUEST_ID_HEADER, call_of
from meterproxy.call import Call
from meterproxy.errors import GatewayError

# mitmproxy's own (even if this module were imported again after the wrapper was installed)
ORIGINAL = getattr(HttpStream.handle_protocol_error, "__wrapped__", HttpStream.handle_protocol_error)


def failure_response(flow: http.HTTPFlow, reason: str) -> http.Response | None:
    """The gateway's answer to a call whose provider failed before the client got anything, or
    None to leave the failure to mitmproxy (not a gateway call, or one already answered)."""
    call = call_of(flow)
    if call is None or call.refusal or not call.opened:
        return None
    status = flow.response.status_code if flow.response is not None else None  # headers came, the body did not
    if call.timeout:
        failure = GatewayError(504, call.timeout, "upstream_timeout")
    elif status is not None:
        failure = GatewayError(502, f"the answer was cut short: {reason}", "upstream_error")
    else:
        failure = GatewayError(502, f"the provider failed before answering: {reason}", "upstream_error")
    return failed(call, failure, status)


def failed(call: Call, failure: GatewayError, provider_status: int | None = None) -> http.Response:
    """The call's failure, as the gateway answers it; one that came before the provider answered
    at all is as safe to try again as a 5xx."""
    call.upstream_failure, call.provider_status = failure, provider_status
    call.retryable_failure = provider_status is None
    headers = {"content-type": "application/json", REQUEST_ID_HEADER: call.request_id}
    return http.Response.make(failure.status, failure.body(), headers)


def handle_protocol_error(self: HttpStream, event):
    """`HttpStream.handle_protocol_error`, but a gateway call that failed upstream before the
    client got anything is answered, as mitmproxy answers a response an addon set."""
    response = None
    if (
        isinstance(event, ResponseProtocolError)
        and self.client_state != self.state_errored
        and not (self.flow.response is not None and self.flow.response.stream)  # a stream began
    ):
        response = failure_response(self.flow, event.message)
    if response is None:
        return (yield from ORIGINAL(self, event))
    self.flow.response = response
    response.timestamp_start = time.time()
    yield HttpResponseHeadersHook(self.flow)
    if (yield from self.check_killed(True)):
        return
    yield from self.send_response()


handle_protocol_error.__wrapped__ = ORIGINAL


class UpstreamFailures:
    """Installs the wrapper when the gateway loads (once: a reloaded script finds it there)."""

    def load(self, loader):
        HttpStream.handle_protocol_error = handle_protocol_error
