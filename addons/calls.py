"""Helpers shared by the addons: the call a flow carries, answering a flow ourselves, and
failing closed when an addon itself breaks."""

import functools
import inspect
import logging
import re

from mitmproxy import http

from meterproxy.call import Call
from meterproxy.errors import GatewayError

CALL = "meterproxy"
REQUEST_ID_HEADER = "x-lava-request-id"
PASSED_ON = "meterproxy_passed_on"  # a proxied request to another host, which the passthrough policy let go
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
_KEY_PARAMETER = re.compile(r"([?&]key=)[^&#]*", re.IGNORECASE)
log = logging.getLogger("meterproxy")


def call_of(flow: http.HTTPFlow) -> Call | None:
    """The live call of a gateway flow, or None for flows the gateway does not meter."""
    call = flow.metadata.get(CALL)
    return call if isinstance(call, Call) else None


def own_path(flow: http.HTTPFlow) -> str | None:
    """The path of a request to the gateway itself (its API, metrics, dashboard) not answered
    yet, without query or trailing slash; None for a proxied request or one answered already."""
    if flow.response or flow.server_conn.address is not None:
        return None
    return flow.request.path.partition("?")[0].rstrip("/")


def answer(flow: http.HTTPFlow, error: GatewayError) -> None:
    """Answer a request to the gateway itself with an error in the OpenAI shape."""
    flow.response = http.Response.make(
        error.status, error.body(), {"content-type": "application/json", **error.headers}
    )


def refuse(flow: http.HTTPFlow, call: Call, error: GatewayError) -> None:
    """Answer locally in the OpenAI error shape; nothing goes upstream, the ledger audits it."""
    call.refusal = error
    for name in CREDENTIAL_HEADERS:  # the flow is kept (mitmweb): no key or token stays on it
        flow.request.headers.pop(name, None)
    if "key=" in flow.request.path:  # nor in `?key=`, a raw `u`'s included
        flow.request.path = _KEY_PARAMETER.sub(r"\1redacted", flow.request.path)
    # A refused CONNECT gets no responseheaders event, where routing adds the request id to the rest.
    headers = {"content-type": "application/json", REQUEST_ID_HEADER: call.request_id, **error.headers}
    flow.response = http.Response.make(error.status, error.body(), headers)


def fail_closed(hook):
    """A bug in a request-phase hook must not let the call through unauthenticated or
    unmetered: it is answered with a 500 instead (and audited)."""

    def handle(flow: http.HTTPFlow, error: Exception) -> None:
        log.error("meterproxy %s failed: %r", hook.__qualname__, error, exc_info=error)
        call = call_of(flow)
        if call is not None and flow.response is None:
            refuse(flow, call, GatewayError(500, "internal gateway error", "internal_error"))

    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def guarded(self, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception as error:
                handle(flow, error)

    else:

        @functools.wraps(hook)
        def guarded(self, flow: http.HTTPFlow) -> None:
            try:
                hook(self, flow)
            except Exception as error:
                handle(flow, error)

    return guarded
