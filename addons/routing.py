"""Routing: `/v1/forward?u=…` and `/<provider>/…` become calls to a registered provider.

Every other host is refused with 403 before anything is sent. The request id is assigned
here and every response of a gateway call carries it as `x-lava-request-id`.
"""

import functools
import logging
from typing import Optional

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.utils.strutils import always_str

from addons.calls import CALL, PASSED_ON, REQUEST_ID_HEADER, call_of, fail_closed, refuse
from meterproxy.call import Call
from meterproxy.errors import GatewayError
from meterproxy.ids import new_id
from meterproxy.metadata import HEADER as METADATA_HEADER
from meterproxy.metadata import parse_metadata
from meterproxy.providers import Registry, forward_path, forward_target, target_host, unknown_endpoint

API_PATHS = ("/v1/requests", "/v1/usage", "/v1/wallets")  # the metering API's (addons/api.py)
# What the gateway itself serves: the metering API, /metrics (addons/metrics.py), the dashboard.
OWN_PATHS = (*API_PATHS, "/metrics", "/dashboard")
METADATA_PREFIX = METADATA_HEADER.encode()


@functools.lru_cache(maxsize=4096)
def _upstream_parts(upstream_url: str) -> tuple[bytes, str, int, bytes, str]:
    """mitmproxy's own parse of a target's URL, and its host header, worked out once."""
    scheme, host, port, path = url.parse(upstream_url)
    host = always_str(host, "idna", "strict")  # as the `host` setter stores it
    return scheme, host, port, path, url.hostport(scheme, host, port)


def retarget(request: http.Request, upstream_url: str) -> None:
    """`request.url = upstream_url`, from the cached parse: the same fields, Host header and
    authority, without parsing and validating the same URL on every call."""
    scheme, host, port, path, host_header = _upstream_parts(upstream_url)
    data = request.data
    data.scheme, data.host, data.port, data.path = scheme, host, port, path
    if "Host" in data.headers:
        data.headers["Host"] = host_header
    if data.authority:
        request.authority = host_header


class Routing:
    def __init__(self) -> None:
        self.registry = Registry()
        self.started = False  # mitmproxy is running: a bad option is refused, not fatal

    def running(self):
        self.started = True

    def load(self, loader):
        loader.add_option(
            "meterproxy_providers",
            Optional[str],
            None,
            "TOML file that adds OpenAI-compatible providers and overrides upstream base URLs.",
        )

    def configure(self, updated):
        if "meterproxy_providers" in updated:
            try:
                self.registry = Registry.from_file(ctx.options.meterproxy_providers)
            except ValueError as error:
                if self.started:
                    raise exceptions.OptionsError(str(error)) from None  # the change is refused
                # At start-up, one line (an OptionsError is logged with a traceback), upon which
                # mitmproxy exits; nothing is served meanwhile.
                self.registry = Registry([])
                logging.getLogger("meterproxy").error(str(error))
                return
            # Where a call goes is decided only when its request is seen: never connect early.
            # Only providers' hosts are intercepted; other traffic passes as raw bytes where the
            # passthrough policy lets it (addons/destinations.py).
            ctx.options.update(connection_strategy="lazy", allow_hosts=self.registry.host_patterns())

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # refused already (the passthrough policy)
        path, _, query = flow.request.path.partition("?")
        # In a CONNECT tunnel or transparent: a client calling a host directly. In transparent
        # mode the host is an address, and the provider is named by SNI or Host.
        proxied = flow.server_conn.address is not None
        if proxied:
            origin = (flow.request.scheme, flow.request.pretty_host.lower(), flow.request.port)
            if origin not in self.registry.by_origin:
                return  # not a provider: passes through untouched, unmetered, unlogged
        elif forward_path(path) is None and path.split("/", 2)[1] not in self.registry.by_name:
            if not path.startswith(OWN_PATHS) and PASSED_ON not in flow.metadata:
                # Meant for the gateway itself, naming nothing it serves (a base URL with a typo).
                call = flow.metadata[CALL] = Call(new_id("req"), flow.request.method)
                call.target_host = path.split("/", 2)[1]
                gateway = f"{flow.request.scheme}://{flow.request.host_header or flow.request.pretty_host}"
                refuse(flow, call, unknown_endpoint(path, gateway))
            return
        call = Call(new_id("req"), flow.request.method, proxied=proxied)
        flow.metadata[CALL] = call
        headers = flow.request.headers
        # One pass over the raw fields: most calls carry no metadata header at all.
        tagged = [
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in headers.fields
            if name.lower().startswith(METADATA_PREFIX)
        ]
        try:
            params = self._route(flow, call, path, query)
            if tagged or "metadata" in params:
                call.metadata = parse_metadata(params.get("metadata"), headers.get(METADATA_HEADER), tagged)
            if "upgrade" in headers:  # a websocket (OpenAI's realtime API): a session nothing here meters
                raise GatewayError(400, "the gateway does not meter websocket sessions", "upgrade_not_supported")
        except GatewayError as error:
            refuse(flow, call, error)
            return
        for name, _ in tagged:
            headers.pop(name, None)
        retarget(flow.request, call.target.upstream_url)

    def serves(self, path: str) -> bool:
        """Whether a request addressed to the gateway names something it serves."""
        path = path.partition("?")[0]
        name = path.split("/", 2)[1] if path.startswith("/") else ""
        return forward_path(path) is not None or path.startswith(OWN_PATHS) or name in self.registry.by_name

    def _route(self, flow: http.HTTPFlow, call: Call, path: str, query: str) -> dict[str, str]:
        """Find the call's target; returns the forward URL's other parameters."""
        if call.proxied:
            call.target_host = flow.request.pretty_host
            call.target = self.registry.resolve(flow.request.pretty_url)
            return {}
        if (joined := forward_path(path)) is not None:
            url, params = forward_target(query, joined)
            call.target_host = target_host(url)
            call.target = self.registry.resolve(url)
            call.fresh = params.get("fresh") == "1"
            return params
        name, _, rest = path[1:].partition("/")
        call.target_host = name
        call.target = self.registry.route(name, f"/{rest}" + (f"?{query}" if query else ""))
        return {}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if call := call_of(flow):
            flow.response.headers[REQUEST_ID_HEADER] = call.request_id
            if is_redirect(flow.response) and not call.refusal:
                call.upstream_failure = REDIRECT_REFUSED  # answered at `response`

    def response(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is not None and call.upstream_failure is REDIRECT_REFUSED and is_redirect(flow.response):
            refuse_redirect(flow, call)


# Never hand a provider's redirect on: a client that follows it would take its credentials to
# wherever it points. The call fails with a 502 instead.
REDIRECT_REFUSED = GatewayError(
    502, "the provider answered with a redirect, which the gateway does not follow", "upstream_redirect"
)


def is_redirect(response: http.Response) -> bool:
    return 300 <= response.status_code < 400


def refuse_redirect(flow: http.HTTPFlow, call: Call) -> None:
    call.upstream_failure = REDIRECT_REFUSED
    headers = {"content-type": "application/json", REQUEST_ID_HEADER: call.request_id}
    flow.response = http.Response.make(REDIRECT_REFUSED.status, REDIRECT_REFUSED.body(), headers)
