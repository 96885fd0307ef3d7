"""Routing: `/v1/forward?u=…` and `/<provider>/…` become calls to a registered provider.

Every other host is refused with 403 before anything is sent. The request id is assigned
here and every response of a gateway call carries it as `x-lava-request-id`.
"""

from typing import Optional

from mitmproxy import ctx, exceptions, http

from addons.calls import CALL, call_of, fail_closed, refuse
from meterproxy.call import Call
from meterproxy.errors import GatewayError
from meterproxy.ids import new_id
from meterproxy.metadata import HEADER as METADATA_HEADER
from meterproxy.metadata import parse_metadata
from meterproxy.providers import Registry, forward_target, target_host

FORWARD_PATHS = ("/v1/forward", "/v1/forward/")
REQUEST_ID_HEADER = "x-lava-request-id"


class Routing:
    def __init__(self) -> None:
        self.registry = Registry()

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
                raise exceptions.OptionsError(str(error)) from None

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        path, _, query = flow.request.path.partition("?")
        if not self._is_gateway_request(flow, path):
            return
        call = Call(new_id("req"), flow.request.method)
        flow.metadata[CALL] = call
        try:
            if path in FORWARD_PATHS:
                url, params = forward_target(query)
                call.target_host = target_host(url)
                call.target = self.registry.resolve(url)
            else:
                name, _, rest = path[1:].partition("/")
                params = {}
                call.target_host = name
                call.target = self.registry.route(name, f"/{rest}" + (f"?{query}" if query else ""))
            headers = flow.request.headers
            call.metadata = parse_metadata(params.get("metadata"), headers.get(METADATA_HEADER), headers.items())
        except GatewayError as error:
            refuse(flow, call, error)
            return
        for name in [name for name in headers if name.lower().startswith(METADATA_HEADER)]:
            del headers[name]
        flow.request.url = call.target.upstream_url

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if call := call_of(flow):
            flow.response.headers[REQUEST_ID_HEADER] = call.request_id

    def _is_gateway_request(self, flow: http.HTTPFlow, path: str) -> bool:
        """A request addressed to the gateway itself, not one passing through as a proxy."""
        if flow.server_conn.address is not None:  # inside a CONNECT tunnel or transparent
            return False
        return path in FORWARD_PATHS or path.split("/", 2)[1] in self.registry.by_name
