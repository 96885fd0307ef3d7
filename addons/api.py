"""The metering API on the gateway's own port (SPEC §1.4): merchants record usage metered
elsewhere and read their own ledger.

    POST /v1/requests            create (idempotent on request_id: 201, then 200; 409 if different)
    GET  /v1/requests/<id>       one record
    GET  /v1/requests            newest first, filtered, cursor-paginated
    GET  /v1/usage               rollups over the same filters: daily, or `group_by` model,
                                 connection, product, metadata.<key>, or several (day,model)
    GET  /v1/wallets             the wallets the merchant's connections draw on

Authentication is the merchant's secret key as a bearer token, or for the reads a dashboard
session (its cookie, `meterproxy/sessions.py`); a merchant only ever sees its own records
(another merchant's id is a 404), the operator's session sees every merchant's. Reads run on
the ledger's `StoreThread`, a usage record on its writer.
"""

import json
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from decimal import Decimal

import pydantic
from mitmproxy import http

from addons.auth import REDACTED
from addons.calls import own_path
from addons.ledger import Ledger
from addons.routing import API_PATHS, Routing
from meterproxy import queries
from meterproxy.api_models import CreateRequest, DailyUsage, ListQuery, RequestPage, RequestRecord, UsageReport
from meterproxy.database import LedgerUnavailable
from meterproxy.errors import GatewayError, ledger_unavailable
from meterproxy.ids import new_id
from meterproxy.ledger import priced
from meterproxy.queries import LedgerFilter
from meterproxy.sessions import COOKIE, Sessions
from meterproxy.store import Store, iso
from meterproxy.token import KeyMode, bearer
from pricing.fees import Tariff

SECRET_FIELDS = {"connection_secret", "product_secret"}
LOW_BALANCE = Decimal(1)  # dollars available under which a wallet is shown as low


class MeteringApi:
    def __init__(self, ledger: Ledger, routing: Routing, sessions: Sessions | None = None) -> None:
        self.ledger = ledger
        self.routing = routing
        self.sessions = sessions or Sessions()  # the dashboard's, which the gateway shares with it

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Waits (returns the answer to await) only for a request to the metering API."""
        path = own_path(flow)
        if path is None or not path.startswith(API_PATHS):
            return None
        return self._serve(flow, path)

    async def _serve(self, flow: http.HTTPFlow, path: str) -> None:
        request_id, headers = new_id("req"), {"content-type": "application/json"}
        try:
            status, body = await self._answer(flow.request, path)
        except GatewayError as error:
            status, body = error.status, json.loads(error.body())
            headers.update(error.headers)
            self.ledger.audit(flow, request_id, error, target_host=None)
        except Exception:
            self.ledger.log.exception("metering API failed")
            status, body = 500, json.loads(GatewayError(500, "internal gateway error", "internal_error").body())
        _scrub(flow.request)
        flow.response = http.Response.make(status, json.dumps(body), headers)

    async def _viewer(self, request: http.Request) -> str | None:
        """The merchant whose records the request may read; None for the operator."""
        secret_key = bearer(request.headers.get("authorization"))
        if secret_key:
            return (await self._read(lambda store: store.merchant(secret_key)))["id"]
        session = self.sessions.viewer(request.cookies.get(COOKIE), time.time())
        if session is None or request.method != "GET":  # a session only reads
            raise GatewayError(401, "send your merchant secret key as a bearer token", "invalid_secret_key")
        return session.merchant_id

    async def _answer(self, request: http.Request, path: str) -> tuple[int, dict]:
        merchant_id = await self._viewer(request)
        if request.method == "POST" and path == "/v1/requests":
            return await self._create(_parse(CreateRequest, request.content or b"{}", json_body=True), merchant_id)
        if request.method != "GET":
            raise GatewayError(405, f"{request.method} is not allowed on {path}", "method_not_allowed")
        if path.startswith("/v1/requests/"):
            request_id = path.removeprefix("/v1/requests/")
            row = await self._read(lambda store: store.request(request_id))
            if row is None or merchant_id not in (None, row["merchant_id"]):
                raise GatewayError(404, f"no request {request_id}", "request_not_found")
            return 200, RequestRecord.from_row(row).model_dump(mode="json")
        if path == "/v1/wallets":
            return 200, {"data": await self._read(lambda store: _wallets(store, merchant_id))}
        query = _list_query(request)
        where = LedgerFilter(
            merchant_id,
            query.connection_id,
            query.product_id,
            query.model,
            query.status,
            query.metadata,
            *query.bounds(),
        )
        if path == "/v1/requests":
            try:
                rows, cursor = await self._read(lambda store: queries.page(store.db, where, query.cursor, query.limit))
            except ValueError as error:
                raise GatewayError(400, str(error), "invalid_cursor") from None
            page = RequestPage(
                data=[RequestRecord.from_row(row) for row in rows], has_more=cursor is not None, next_cursor=cursor
            )
            return 200, page.model_dump(mode="json")
        if path == "/v1/usage":
            return 200, await self._usage(where, query.group_by)
        raise GatewayError(404, f"no such endpoint {path}", "not_found")

    async def _usage(self, where: LedgerFilter, by: str) -> dict:
        try:
            for name in by.split(","):
                queries.group_key(name)
        except ValueError as error:
            raise GatewayError(400, str(error), "invalid_group_by") from None

        named = {"connection", "product"} & {*by.split(",")}

        def report(store: Store) -> tuple[list[dict], dict[str, str]]:
            groups = queries.rollup(queries.matching(store.db, where), by)
            return groups, queries.names(store.db, where.merchant_id) if named else {}

        groups, names = await self._read(report)
        if by == "day":
            return UsageReport(data=[DailyUsage(date=day.pop("day"), **day) for day in groups]).model_dump(mode="json")
        for group in groups:
            for name in named:
                group[f"{name}_name"] = names.get(group[name])
        return {"group_by": by, "data": groups}

    async def _read(self, job):
        """A read on the store thread; a ledger that cannot be read is a 503 SDKs try again."""
        try:
            return await self.ledger.store_thread.call(job)
        except LedgerUnavailable:
            raise ledger_unavailable() from None

    async def _create(self, record: CreateRequest, merchant_id: str) -> tuple[int, dict]:
        provider = self.routing.registry.by_name.get(record.provider)
        if provider is None:
            raise GatewayError(400, f"unknown provider {record.provider!r}", "unknown_provider")
        prices, now = self.ledger.prices, datetime.now(UTC)

        def create(store: Store) -> tuple[dict, bool]:
            principal = store.principal(merchant_id, record.connection_secret, record.product_secret)
            key_mode = KeyMode.UNMANAGED if principal.connection_id is None else KeyMode.MANAGED
            tariff = Tariff(provider.price_provider, record.model, principal.fees, key_mode)
            fields, wallet_cost = priced(tariff, record.usage(), now, prices)
            row = {
                "request_id": record.request_id or new_id("req"),
                "provider": provider.name,
                "endpoint": "POST /v1/requests",
                "key_mode": key_mode.value,
                "model": record.model,
                "merchant_id": merchant_id,
                "connection_id": principal.connection_id,
                "product_id": principal.product_id,
                "wallet_id": principal.wallet_id,
                "metadata": record.metadata,
                "stream": False,
                "cache_hit": False,
                "attempts": 0,
                "created_at": iso(now),
                "completed_at": iso(now),
                **fields,
            }
            return store.record_usage(row, principal.wallet_id, wallet_cost)

        try:
            row, created = await self.ledger.writer.call(create)
        except LedgerUnavailable:  # the writer has said why in the log
            raise ledger_unavailable() from None
        if created:
            self.ledger.announce(row)
        return (201 if created else 200), RequestRecord.from_row(row).model_dump(mode="json")


def _wallets(store: Store, merchant_id: str | None) -> list[dict]:
    """Balance, held and available of each wallet the viewer's connections draw on."""
    wallets = [store.wallet(wallet_id) for wallet_id in queries.wallet_ids(store.db, merchant_id)]
    return [
        {
            "id": wallet["id"],
            "name": wallet["name"],
            "balance": wallet["balance"],
            "held": wallet["held"],
            "available": wallet["available"],
            "low": Decimal(wallet["available"]) < LOW_BALANCE,
        }
        for wallet in wallets
    ]


def _list_query(request: http.Request) -> ListQuery:
    params: dict = {"metadata": {}}
    for name, value in request.query.items(multi=True):
        if name.startswith("metadata."):
            params["metadata"][name.removeprefix("metadata.")] = value
        else:
            params[name] = value
    return _parse(ListQuery, params)


def _parse(model: type[pydantic.BaseModel], data, json_body: bool = False):
    try:
        return model.model_validate_json(data) if json_body else model.model_validate(data)
    except pydantic.ValidationError as error:
        reasons = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'body'}: {item['msg']}" for item in error.errors())
        raise GatewayError(400, reasons, "invalid_request") from None


def _scrub(request: http.Request) -> None:
    """The flow is kept (mitmweb, saved flows) and may be logged whole (`flow_detail`): no
    secret of the merchant's stays on it once it has been read."""
    if "authorization" in request.headers:
        request.headers["authorization"] = REDACTED
    request.headers.pop("cookie", None)  # a dashboard session's
    try:
        body = json.loads(request.content or b"")
    except ValueError:
        return
    if isinstance(body, dict) and SECRET_FIELDS & body.keys():
        request.content = json.dumps({**body, **{name: REDACTED for name in SECRET_FIELDS & body.keys()}}).encode()
