"""Surviving a provider's faults (SPEC §3, §7).

An addon cannot feed a response from anywhere but the upstream connection. So:

- `Retries` retries a non-streamed call that the provider answered 429, 500, 502 or 503, or that
  failed before the provider answered at all (a timeout, a dropped connection: addons/failures.py),
  with exponential backoff and jitter, honouring `Retry-After`, failing over to the next managed
  key on 429. Nothing has reached the client yet when the `response` hook runs. A streamed call's
  error status is passed on untouched, `Retry-After` included: a retried stream could only
  reach the client buffered, never chunk by chunk.
- `UpstreamWatch` checks, before forwarding, that a provider it has not heard from lately
  accepts connections (retrying with backoff), and answers 502 / 504 in the OpenAI shape when
  it does not; and it cuts a provider that sends no first byte, or stalls a stream, for longer
  than the configured timeouts.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable

import httpx2
from mitmproxy import ctx, http

from addons.auth import Auth, put_key
from addons.calls import call_of
from addons.failures import failed
from addons.routing import REQUEST_ID_HEADER, is_redirect, refuse_redirect
from meterproxy.errors import GatewayError
from meterproxy.retry import RETRYABLE_STATUSES, RetryPolicy
from meterproxy.token import KeyMode

HOP_BY_HOP = ("host", "content-length", "connection", "transfer-encoding", "keep-alive")


def policy() -> RetryPolicy:
    return RetryPolicy(attempts=ctx.options.meterproxy_attempts, max_wait=ctx.options.meterproxy_max_retry_wait)


class Retries:
    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self._client: httpx2.AsyncClient | None = None
        self._closing: asyncio.Task | None = None  # the old client's closing: the loop keeps tasks only weakly

    def load(self, loader):
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per retry is ours to log
        loader.add_option("meterproxy_attempts", int, 3, "Attempts per call, the first included.")
        loader.add_option(
            "meterproxy_max_retry_wait", int, 30, "Seconds: a longer Retry-After is passed on, not waited for."
        )
        loader.add_option("meterproxy_connect_timeout", int, 10, "Seconds to connect to a provider.")
        loader.add_option("meterproxy_first_byte_timeout", int, 120, "Seconds a provider may take to start answering.")
        loader.add_option("meterproxy_idle_timeout", int, 60, "Seconds a stream may stall between chunks.")

    def configure(self, updated):
        if {"meterproxy_connect_timeout", "meterproxy_first_byte_timeout", "meterproxy_idle_timeout"} & updated:
            self._client = None  # made again with the new timeouts when next needed; calls in flight keep the old

    def done(self):
        """Closes the client in a task of its own: a script's unload calls done without awaiting it."""
        client, self._client = self._client, None
        if client is not None:
            self._closing = asyncio.get_running_loop().create_task(client.aclose())

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Waits (returns the retries to await) only for an answer worth trying again."""
        call = call_of(flow)
        if call is None or call.refusal or call.stream or not worth_retrying(flow, call):
            return None  # the usual case
        return self._retry(flow, call)

    async def _retry(self, flow: http.HTTPFlow, call) -> None:
        retry_policy = policy()
        while worth_retrying(flow, call):
            wait = retry_policy.wait_before(call.attempts + 1, flow.response.headers.get("retry-after"))
            if wait is None:
                return
            await asyncio.sleep(wait)
            if flow.response.status_code == 429 and call.key_mode is KeyMode.MANAGED:
                call.key = self.auth.managed_keys.next_key(call.target.provider) or call.key
            call.attempts += 1
            call.upstream_failure, call.retryable_failure, call.timeout = None, False, None
            flow.response = await self._attempt(flow, call)
            flow.response.headers[REQUEST_ID_HEADER] = call.request_id
            if is_redirect(flow.response):
                refuse_redirect(flow, call)  # a 502 of the gateway's own, not to be retried
                return

    async def _attempt(self, flow: http.HTTPFlow, call) -> http.Response:
        request = flow.request
        headers = [(name, value) for name, value in request.headers.items(multi=True) if name.lower() not in HOP_BY_HOP]
        outgoing = httpx2.Headers(headers)
        if call.key:
            put_key(outgoing, call.target.provider, call.key)
        try:
            answer = await self.client.request(
                request.method, request.url, headers=outgoing, content=request.raw_content
            )
        except httpx2.TimeoutException:
            waited = ctx.options.meterproxy_first_byte_timeout
            return failed(call, GatewayError(504, f"the provider sent nothing for {waited} s", "upstream_timeout"))
        except httpx2.HTTPError as error:
            failure = GatewayError(502, f"the provider failed before answering: {error}", "upstream_error")
            return failed(call, failure)
        kept = [(name, value) for name, value in answer.headers.raw if name.lower().decode() not in HOP_BY_HOP]
        return http.Response.make(answer.status_code, answer.content, kept)  # encoded again as its headers say

    @property
    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            timeout = httpx2.Timeout(
                connect=ctx.options.meterproxy_connect_timeout,
                read=ctx.options.meterproxy_first_byte_timeout,
                write=ctx.options.meterproxy_idle_timeout,
                pool=ctx.options.meterproxy_connect_timeout,
            )
            # Straight to the provider, as mitmproxy's own first attempt goes: no proxy from the environment.
            self._client = httpx2.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
        return self._client


def worth_retrying(flow: http.HTTPFlow, call) -> bool:
    """A provider's 429 or 5xx, or a failure before it answered at all (addons/failures.py)."""
    if call.upstream_failure is not None:
        return call.retryable_failure
    return flow.response.status_code in RETRYABLE_STATUSES


class UpstreamWatch:
    def __init__(self) -> None:
        self.heard_from: dict[tuple[str, int], float] = {}  # upstream address → last answer
        self.health_window = self.first_byte_timeout = self.idle_timeout = 0  # read in `configure`, not per call

    def load(self, loader):
        loader.add_option(
            "meterproxy_health_window",
            int,
            30,
            "Seconds: a provider not heard from for longer is checked for reachability before forwarding.",
        )

    def configure(self, updated):
        if "meterproxy_health_window" in updated:
            self.health_window = ctx.options.meterproxy_health_window
        if "meterproxy_first_byte_timeout" in updated:
            self.first_byte_timeout = ctx.options.meterproxy_first_byte_timeout
        if "meterproxy_idle_timeout" in updated:
            self.idle_timeout = ctx.options.meterproxy_idle_timeout

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Waits (returns the check to await) only for a provider not heard from lately."""
        call = call_of(flow)
        if call is None or call.refusal or not call.opened or flow.response is not None:
            return None  # flow.response: answered already (from the cache)
        address = (flow.request.host, flow.request.port)
        if time.monotonic() - self.heard_from.get(address, -1e9) > self.health_window:
            return self._check_then_watch(flow, call, address)
        self._watch_first_byte(flow, call)
        return None

    async def _check_then_watch(self, flow: http.HTTPFlow, call, address: tuple[str, int]) -> None:
        failure = await self._reach(address, call)
        if failure is not None:
            call.upstream_failure = failure
            flow.response = http.Response.make(failure.status, failure.body(), {"content-type": "application/json"})
            return
        self._watch_first_byte(flow, call)

    def _watch_first_byte(self, flow: http.HTTPFlow, call) -> None:
        timeout = self.first_byte_timeout
        call.watchdog = asyncio.get_running_loop().call_later(
            timeout, cut_upstream, flow, f"the provider sent nothing for {timeout} s"
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal or call.upstream_failure:
            return
        self.heard_from[(flow.request.host, flow.request.port)] = time.monotonic()
        if call.watchdog is not None:
            call.watchdog.cancel()
        if call.meter is not None:
            self._watch_idle(flow, call)
        elif not flow.response.stream:  # a body held until its end: it has as long as a first byte
            timeout = self.first_byte_timeout
            call.watchdog = asyncio.get_running_loop().call_later(
                timeout, cut_upstream, flow, f"the provider did not finish its answer within {timeout} s"
            )

    def error(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None:
            return
        if call.watchdog is not None:
            call.watchdog.cancel()
        if flow.response is None:  # never answered: check it before the next call
            self.heard_from.pop((flow.request.host, flow.request.port), None)

    def response(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is not None and call.watchdog is not None:
            call.watchdog.cancel()

    async def _reach(self, address: tuple[str, int], call) -> GatewayError | None:
        """Connect and let go, with backoff between attempts; the failure when all fail."""
        retry_policy, timed_out = policy(), False
        while True:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(*address), ctx.options.meterproxy_connect_timeout
                )
            except TimeoutError:
                timed_out = True
            except OSError:
                timed_out = False
            else:
                writer.close()
                return None
            wait = retry_policy.wait_before(call.attempts + 1, None)
            if wait is None:
                break
            await asyncio.sleep(wait)
            call.attempts += 1
        if timed_out:
            return GatewayError(
                504, f"provider timed out connecting after {call.attempts} attempts", "upstream_timeout"
            )
        return GatewayError(502, f"provider unreachable after {call.attempts} attempts", "upstream_unreachable")

    def _watch_idle(self, flow: http.HTTPFlow, call) -> None:
        """Cut a stream that stalls; the timer goes when the stream ends (`response`, `error`),
        so that an ended flow is not kept for the length of the timeout."""
        idle, meter = self.idle_timeout, call.meter
        loop = asyncio.get_running_loop()

        def check() -> None:
            if not flow.live:
                return
            quiet = time.monotonic() - meter.last_chunk_at
            if quiet >= idle:
                cut_upstream(flow, f"the stream stalled for {idle} s")
            else:
                call.watchdog = loop.call_later(idle - quiet, check)

        call.watchdog = loop.call_later(idle, check)


def cut_upstream(flow: http.HTTPFlow, reason: str) -> None:
    """Close the flow's upstream connection. mitmproxy 12 still cannot kill a flow in transit
    (mitmproxy#4711), so the connection is closed under it: mitmproxy then ends the flow as a
    server disconnect, answered by addons/failures.py (a 504 to the client), or a cut stream."""
    call = call_of(flow)
    if call is None or not flow.live:
        return
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    transport = handler.transports.get(flow.server_conn) if handler else None
    if transport is not None and transport.writer is not None:
        call.timeout = reason
        transport.writer.close()
