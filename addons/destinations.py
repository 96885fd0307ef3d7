"""Destinations: the passthrough policy for proxied traffic to hosts that are not providers.

Providers' hosts are intercepted and metered (routing does that). Any other destination of a
CONNECT (checked before the tunnel opens), of an absolute-form request, or of a transparently
redirected connection is resolved and checked against `meterproxy_passthrough`
(`meterproxy/destinations.py`); a refusal is a 403 `destination_refused` in the OpenAI shape,
audited, and nothing connects. An allowed tunnel or request is pinned to the address that was
checked, so that a name cannot resolve to another address between the check and the connection.
"""

import asyncio
import logging
import socket
from collections.abc import Awaitable

from mitmproxy import ctx, http
from mitmproxy.proxy import server_hooks

from addons.calls import CALL, PASSED_ON, refuse
from meterproxy.call import Call
from meterproxy.destinations import OwnListeners, Policy, parse_address, refusal
from meterproxy.errors import GatewayError
from meterproxy.ids import new_id

log = logging.getLogger("meterproxy")
# A refusal closes the client's connection: mitmproxy keeps a refused CONNECT's destination on
# the connection, and later requests on it would look like a tunnel's.
REFUSAL_HEADERS = {"connection": "close"}
VIA = f"meterproxy-{new_id('gw')[3:]}"  # this process, in the Via header of what it passes on


def fail_closed(check):
    """A check that breaks refuses: a bug must never open the relay."""

    async def guarded(self, flow: http.HTTPFlow) -> None:
        try:
            await check(self, flow)
        except Exception:
            log.exception("the destination check of %s failed: refused", flow.request.host)
            if flow.response is None:
                self._refuse(
                    flow,
                    GatewayError(403, "destination refused: the check failed", "destination_refused", REFUSAL_HEADERS),
                )

    return guarded


class Destinations:
    def __init__(self, routing) -> None:
        self.routing = routing  # its registry tells providers' hosts from the rest
        self.policy = Policy.PUBLIC
        self.listeners: tuple[OwnListeners, OwnListeners] | None = None  # with mitmweb's port, without

    def load(self, loader):
        loader.add_option(
            "meterproxy_passthrough",
            str,
            Policy.PUBLIC.value,
            "In proxy modes, where traffic to hosts that are not providers may go: 'public' (only to "
            "public addresses), 'none' (nowhere), 'all' (anywhere: a trusted network only).",
            choices=[policy.value for policy in Policy],
        )

    def configure(self, updated):
        if "meterproxy_passthrough" in updated:
            self.policy = Policy(ctx.options.meterproxy_passthrough)
        if {"listen_host", "listen_port", "mode", "web_host", "web_port"} & updated:
            self.listeners = None

    def running(self):
        if self.policy is Policy.ALL:
            log.warning(
                "meterproxy_passthrough=all: the proxy relays to any address its clients name, loopback and "
                "private ones included; use it only on a network where every client is trusted"
            )
        self.listeners = None  # the servers are up: their addresses are known now

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A tunnel: refused before it opens, or pinned to the address checked."""
        if flow.response is None and not self._is_provider(flow.request.host, flow.request.port):
            return self._check(flow)
        return None

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A plain-HTTP request for another host: transparently redirected, in a tunnel, or in
        absolute form through the proxy port. mitmproxy 12 turns the absolute form into the
        origin form before any addon sees it, so a request is taken as addressed to the gateway
        itself when it names something the gateway serves or its host is one of the gateway's
        listeners. Returns the check to await only for a request that may be for another host:
        not a gateway call's, nor one that routing sends to a provider."""
        request = flow.request
        if flow.response is not None:
            return None
        if VIA in request.headers.get("via", ""):  # it came back to us: a balancer in front, say
            self._refuse(flow, GatewayError(508, "the request came back to the gateway", "proxy_loop", REFUSAL_HEADERS))
            return None
        if flow.server_conn.address is not None:  # in a tunnel, or transparent
            if (request.scheme, request.pretty_host.lower(), request.port) in self.routing.registry.by_origin:
                return None  # routing sends it to that provider, wherever the connection pointed
        elif self.routing.serves(request.path):
            return None  # the usual case
        return self._check_request(flow)

    @fail_closed
    async def _check_request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        addresses, failure = await self._addresses(request.host, request.port)
        if flow.server_conn.address is None and self._own_listeners(web=False).includes_any(addresses, request.port):
            return  # addressed to the gateway, naming nothing it serves: routing's 404
        reason = self._refusal(addresses, failure, request.host, request.port)
        if reason is not None:
            self._refuse(
                flow, GatewayError(403, f"destination refused: {reason}", "destination_refused", REFUSAL_HEADERS)
            )
            return
        flow.metadata[PASSED_ON] = True
        request.headers.add("via", f"{request.http_version[5:]} {VIA}")
        self._pin(flow, addresses)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> Awaitable[None] | None:
        """The last line: any connection mitmproxy opens (a raw passthrough in transparent mode
        included) that is not to a provider, pinned to the address it checks; connections to
        providers, and to an upstream proxy (whose destination was checked), pass at once."""
        host, port = data.server.address[:2]
        if data.server.error or data.server.via is not None:
            return None
        if self._is_provider(host, port) or self._is_upstream(host, port):
            return None
        return self._check_connection(data)

    async def _check_connection(self, data: server_hooks.ServerConnectionHookData) -> None:
        host, port = data.server.address[:2]
        try:
            addresses, failure = await self._addresses(host, port)
            reason = self._refusal(addresses, failure, host, port)
        except Exception:
            log.exception("the destination check of %s:%s failed: refused", host, port)
            reason = "the check failed"
        if reason is not None:
            data.server.error = f"destination refused: {reason}"
            log.warning("refused a connection from %s to %s:%s: %s", data.client.peername, host, port, reason)
        elif parse_address(host) is None:
            data.server.address = (str(addresses[0]), port)  # where the check said

    @fail_closed
    async def _check(self, flow: http.HTTPFlow) -> None:
        host, port = flow.request.host, flow.request.port
        addresses, failure = await self._addresses(host, port)
        reason = self._refusal(addresses, failure, host, port)
        if reason is not None:
            self._refuse(
                flow, GatewayError(403, f"destination refused: {reason}", "destination_refused", REFUSAL_HEADERS)
            )
        else:
            self._pin(flow, addresses)

    def _refusal(self, addresses: list, failure: str | None, host: str, port: int) -> str | None:
        if self.policy is Policy.NONE:
            return f"{host} is not a provider, and meterproxy_passthrough is 'none'"
        return failure or refusal(addresses, port, self.policy, self._own_listeners())

    @staticmethod
    async def _addresses(host: str, port: int) -> tuple[list, str | None]:
        """All the addresses `host` stands for, or why there are none."""
        if (address := parse_address(host)) is not None:
            return [address], None
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            return [], f"{host} does not resolve ({error.strerror or error})"
        return list(dict.fromkeys(parse_address(entry[4][0]) for entry in found)), None

    @staticmethod
    def _refuse(flow: http.HTTPFlow, error: GatewayError) -> None:
        call = flow.metadata[CALL] = Call(new_id("req"), flow.request.method, proxied=True)
        call.target_host = flow.request.host
        refuse(flow, call, error)

    @staticmethod
    def _pin(flow: http.HTTPFlow, addresses: list) -> None:
        """Connect to the address that was checked (the Host header keeps the name)."""
        if addresses and parse_address(flow.request.host) is None:
            flow.request.data.host = str(addresses[0])

    def _own_listeners(self, web: bool = True) -> OwnListeners:
        """The proxy's listeners (and mitmweb's web port), their names resolved once."""
        if self.listeners is None:
            proxyserver = ctx.master.addons.get("proxyserver")
            proxies = [(str(host), port) for host, port, *_ in (proxyserver.listen_addrs() if proxyserver else [])]
            web_ui = [(ctx.options.web_host, ctx.options.web_port)] if "web_port" in ctx.options else []
            self.listeners = (OwnListeners(proxies + web_ui), OwnListeners(proxies))
        return self.listeners[0 if web else 1]

    def _is_provider(self, host: str, port: int) -> bool:
        return (host.lower(), port) in self.routing.registry.provider_hosts

    def _is_upstream(self, host: str, port: int) -> bool:
        return (host.lower(), port) in self.routing.registry.upstream_hosts
