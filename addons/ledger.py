"""The ledger: a `pending` row before the call goes upstream, completed (priced, wallet
charged) when it ends, and an audit entry for every request refused before forwarding.

The ledger's writes go through the `LedgerWriter`, on the event loop; only the pending row is
awaited. Reads that may take long (the metering API) and the response cache's bodies go to the
`StoreThread`.
"""

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Optional
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http

from addons.calls import CALL, call_of, fail_closed, refuse
from addons.inspection import show_refusal, show_settled
from addons.limits import limit_rate
from meterproxy import estimate
from meterproxy.call import Call
from meterproxy.database import LedgerUnavailable, is_postgres
from meterproxy.errors import GatewayError, ledger_unavailable
from meterproxy.leases import DEFAULT_LEASE, dead_here, lease_end, new_gateway
from meterproxy.ledger import (
    Outcome,
    closing_fields,
    from_timestamp,
    needs_estimate,
    opening_row,
    require_price,
    worst_case_hold,
)
from meterproxy.store import Store, utc_now
from meterproxy.store_thread import StoreThread
from meterproxy.writer import LedgerWriter
from pricing.prices import DEFAULT_OVERRIDES, PriceBook

# This process's gateway in each ledger it serves (its row in `gateways`, meterproxy/leases.py).
# A script reload makes a new Ledger in the same process (this module is not loaded again): it
# is the same gateway, and the calls in flight (IN_FLIGHT) stay its own.
GATEWAYS: dict[str, dict] = {}
# The calls admitted and not completed in this process, by request id: a reload's new Ledger
# completes the calls of the one before it, and completes them all when the process stops.
IN_FLIGHT: dict[str, http.HTTPFlow] = {}
STOPPED = "the gateway stopped during the call"
CLIENT_LEFT = ("Client disconnected", "stream reset by client")  # mitmproxy's words, HTTP/1 and HTTP/2


class Ledger:
    log = logging.getLogger("meterproxy")

    def __init__(self) -> None:
        self.writer: LedgerWriter | None = None
        self.store_thread: StoreThread | None = None
        self.prices = PriceBook()
        self.gateway: dict | None = None
        self.retired = False  # the process stops: this gateway has left the ledger
        self.lease = DEFAULT_LEASE
        self.refuse_unpriced = True  # `meterproxy_unpriced`: refuse (SPEC §5) or serve
        self.keeps_flows = False  # a UI or a save file keeps flows: show each its outcome
        # Told of every row once it has committed completed or error (metrics, the dashboard's
        # live view), and of every refusal.
        self.settled: list[Callable[[dict], None]] = []
        self.refused: list[Callable[[GatewayError], None]] = []
        # The tokenizer, off the event loop; the completions that wait for it, by its future.
        self.estimator = ThreadPoolExecutor(max_workers=2, thread_name_prefix="meterproxy-estimate")
        self.estimating: dict[Future, tuple[http.HTTPFlow, Call, Outcome]] = {}

    def load(self, loader):
        loader.add_option(
            "meterproxy_db",
            str,
            "meterproxy.sqlite",
            "The ledger and accounts: a SQLite file, or postgresql://user@host/db (the password from "
            "PGPASSWORD or ~/.pgpass, never here).",
        )
        loader.add_option(
            "meterproxy_lease",
            int,
            DEFAULT_LEASE,
            "Seconds after which the calls of a gateway that stopped renewing its lease (it died) are "
            "interrupted by the gateways that live (at least 1).",
        )
        loader.add_option(
            "meterproxy_prices",
            Optional[str],
            str(DEFAULT_OVERRIDES),
            "TOML file of price overrides (dollars per million tokens), consulted before genai-prices.",
        )
        loader.add_option(
            "meterproxy_unpriced",
            str,
            "refuse",
            "A call to a model with no price, when someone would be charged (managed key, product with fees): "
            "refuse it (403 model_not_priced) or serve it (answered, an error row that charges nothing).",
            choices=["refuse", "serve"],
        )

    def configure(self, updated):
        if "save_stream_file" in updated:
            self.keeps_flows = hasattr(ctx.master, "view") or bool(ctx.options.save_stream_file)
        if "meterproxy_prices" in updated:
            try:
                self.prices = PriceBook.from_file(ctx.options.meterproxy_prices)
            except ValueError as error:
                raise exceptions.OptionsError(str(error)) from None
        if "meterproxy_unpriced" in updated:
            self.refuse_unpriced = ctx.options.meterproxy_unpriced == "refuse"
        if "meterproxy_db" in updated:
            self._open(ctx.options.meterproxy_db)

    def _open(self, target: str) -> None:
        """The database, once: a call completes in the database that admitted it, so another
        one cannot take its place while calls may be in flight."""
        if self.writer is not None:
            if target == self.writer.path:
                return
            raise exceptions.OptionsError("meterproxy_db cannot change while the gateway runs: restart it")
        if is_postgres(target) and urlsplit(target).password is not None:
            raise exceptions.OptionsError("meterproxy_db must not carry a password: use PGPASSWORD or ~/.pgpass")
        # Load the tokenizer now, so that the first estimate does not wait for it.
        threading.Thread(target=estimate.encoding, args=(estimate.DEFAULT,), daemon=True).start()
        self._close_database()  # what an open that failed had started
        self.lease = lease = max(1, ctx.options.meterproxy_lease)
        gateway = GATEWAYS.get(target) or new_gateway(lease)
        try:
            self.store_thread = StoreThread(target, every=((lease / 4, self._renew),))
            interrupted = 0
            if target not in GATEWAYS:  # before any admission: what its dead predecessors left
                interrupted = self.store_thread.submit(lambda store: _register(store, gateway), writes=True).result()
            self.writer = LedgerWriter(target)
        except Exception as error:
            raise exceptions.OptionsError(f"cannot open {_shown(target)}: {error}") from None
        GATEWAYS[target], self.gateway = gateway, gateway
        if interrupted:
            self.log.warning("%d requests were interrupted by gateways that stopped; marked as errors", interrupted)

    def _renew(self, store: Store) -> None:
        """Renew this gateway's lease, and interrupt the calls of gateways whose lease expired."""
        with store.transaction():
            if not store.renew_lease(self.gateway, lease_end(self.lease)):
                self.log.error("this gateway's lease had expired: its calls then in flight were taken for interrupted")
            interrupted = store.recover(dead_here)
        if interrupted:
            self.log.warning("%d requests of gateways that stopped were interrupted; marked as errors", interrupted)

    def done(self):
        """Stop, for good or for a reload. A process that stops ends the calls in flight, and
        mitmproxy tells of their end only after this: they are completed first, charged for what
        they delivered, and the gateway leaves the ledger. A reload leaves them to the next
        Ledger. Either way, the calls whose estimates are being worked out are completed before
        the writer stops."""
        stopping = ctx.master.should_exit.is_set()
        if stopping:
            for flow in list(IN_FLIGHT.values()):
                self._close(flow, call_of(flow), error=STOPPED, stopping=True)
        wait(list(self.estimating))
        for working_out in list(self.estimating):
            self._estimated(working_out)
        self.estimator.shutdown()
        if stopping and self.writer is not None:
            self.retired = True
            self.writer.stop()
            self.writer = None
            gateway = GATEWAYS.pop(self.store_thread.path)
            self.store_thread.submit(lambda store: store.retire_gateway(gateway["id"]), writes=True).result()
        self._close_database()

    def _close_database(self) -> None:
        if self.writer is not None:
            self.writer.stop()
            self.writer = None
        if self.store_thread is not None:
            self.store_thread.stop()
            self.store_thread = None

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """Admission, in one transaction of the writer: the token's secrets, the connection's
        rate limits, the hold on the wallet, the pending row."""
        call = call_of(flow)
        if call is None or call.refusal:
            return
        started = from_timestamp(flow.request.timestamp_start)
        body, prices, gateway_id = flow.request.raw_content or b"", self.prices, self.gateway["id"]
        unpriced_refused = self.refuse_unpriced

        def admit(store: Store) -> None:
            if call.token is not None:
                call.principal = store.authorize(call.token)
            if unpriced_refused:
                require_price(call, prices)
            rate_tokens = limit_rate(store, call, len(body), started)
            row = {**opening_row(call, started), "gateway_id": gateway_id, "rate_tokens": rate_tokens}
            store.open_request(row, worst_case_hold(call, body, prices, started))

        try:
            await self.writer.call(admit, atomic=True)  # its refusals come before its writes
        except GatewayError as error:
            refuse(flow, call, error)
            return
        except LedgerUnavailable:  # not forwarded unrecorded; the writer has said why in the log
            refuse(flow, call, ledger_unavailable())
            return
        if self.retired:  # the gateway stopped meanwhile and left the ledger: its row is interrupted
            refuse(flow, call, ledger_unavailable())
            return
        call.opened = True
        IN_FLIGHT[call.request_id] = flow

    def response(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None:
            return
        if call.refusal:
            self._refused(flow, call)
        elif call.opened:
            self._close(flow, call, error=None)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        """A tunnel refused before it opened (the passthrough policy): audited like any refusal."""
        call = call_of(flow)
        if call is not None and call.refusal:
            self._refused(flow, call)

    def error(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None:
            return
        if call.refusal:  # the client left before its refusal could be sent (a body it never finished)
            self._refused(flow, call)
        elif call.opened:
            error = call.timeout or (flow.error.msg if flow.error else "request failed")
            self._close(flow, call, error, client_left=error.startswith(CLIENT_LEFT))

    def _refused(self, flow: http.HTTPFlow, call: Call) -> None:
        self.audit(flow, call.request_id, call.refusal, call.target_host)
        show_refusal(flow, call.refusal)
        # The flow is kept (mitmweb, saved flows): leave plain data on it, not the live call.
        flow.metadata[CALL] = {"request_id": call.request_id, "refused": call.refusal.code}

    def _close(
        self, flow: http.HTTPFlow, call: Call, error: str | None, stopping: bool = False, client_left: bool = False
    ) -> None:
        """Hand the completion to the writer; the client's stream ends without waiting for it.
        `stopping`: the gateway stops, and an estimate is worked out here and now."""
        response = flow.response
        outcome = Outcome(
            started=from_timestamp(flow.request.timestamp_start),
            first_byte=from_timestamp(response.timestamp_start) if response else None,
            ended=datetime.now(UTC),
            # A 502/504 of the gateway's own is not the provider's status.
            upstream_status=response.status_code if response and not call.upstream_failure else call.provider_status,
            error=error,
            streamed=bool(response and response.stream),
            client_left=client_left,
        )
        call.opened = False  # one completion per call, whichever hook comes first
        del IN_FLIGHT[call.request_id]
        if self._stopped("the completion of %s (its row is interrupted)", call.request_id):
            return
        if needs_estimate(call, outcome) and not stopping:  # the tokenizer runs off the event loop first
            working_out = self.estimator.submit(call.dialect.metered_usage, call.request_body)
            self.estimating[working_out] = (flow, call, outcome)
            asyncio.wrap_future(working_out).add_done_callback(lambda _: self._estimated(working_out))
        else:
            self._complete(flow, call, outcome)

    def _estimated(self, working_out: Future) -> None:
        waiting = self.estimating.pop(working_out, None)
        if waiting is not None:  # else `done` has completed it
            self._complete(*waiting)

    def _complete(self, flow: http.HTTPFlow, call: Call, outcome: Outcome) -> None:
        prices = self.prices

        def complete(store: Store) -> dict:
            fields, wallet_cost = closing_fields(call, outcome, prices)
            if not store.complete_request(call.request_id, fields, call.principal.wallet_id, wallet_cost):
                self.log.error(
                    "%s was taken for interrupted while it ran (this gateway's lease had expired): not charged",
                    call.request_id,
                )
            return fields

        self.writer.post(complete, atomic=True, then=lambda fields: self._settled(flow, call, outcome, fields))

    def _settled(self, flow: http.HTTPFlow, call: Call, outcome: Outcome, fields: dict) -> None:
        """The row has committed: tell whoever watches, and the flow if it is kept."""
        if self.settled:
            self.announce({**opening_row(call, outcome.started), **fields})
        if self.keeps_flows:
            show_settled(flow, call, fields)
            flow.metadata[CALL] = {"request_id": call.request_id, **fields}

    def announce(self, row: dict) -> None:
        """A row has committed completed or error (here, or through the metering API)."""
        for observer in self.settled:
            try:
                observer(row)
            except Exception:
                self.log.exception("ledger observer failed")

    def audit(self, flow: http.HTTPFlow, request_id: str, refusal: GatewayError, target_host: str | None) -> None:
        """Record a refusal: when, why, from where, to where; never a secret."""
        entry = {
            "created_at": utc_now(),
            "request_id": request_id,
            "status": refusal.status,
            "code": refusal.code,
            "reason": refusal.message,
            "client_address": flow.client_conn.peername[0] if flow.client_conn.peername else None,
            "target_host": target_host,
        }
        if not self._stopped("the refusal of %s", request_id):
            self.writer.post(lambda store: store.record_audit(entry), at_once=True, atomic=True)
        for observer in self.refused:
            observer(refusal)

    def _stopped(self, what: str, *args) -> bool:
        """Whether the ledger has stopped: what ends after it (a call that mitmproxy lets finish
        during the stop) is not recorded, and says so (`what % args`, formatted only then)."""
        if self.writer is None:
            self.log.warning("the ledger has stopped: " + what + " is not recorded", *args)
        return self.writer is None


def _register(store: Store, gateway: dict) -> int:
    """Join the ledger's gateways, and interrupt the calls of those that are gone."""
    store.register_gateway(gateway)
    return store.recover(dead_here)


def _shown(target: str) -> str:
    """The database's name as a log may show it."""
    return target.split("?", 1)[0]
