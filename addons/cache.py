"""The response cache: pay once for the same question (opt-in per product, or per request).

After admission, a request whose answer is kept is answered from the cache: it writes its own
ledger row (`cache_hit`, the kept answer's usage, provider cost 0, the product's fees) and never
reaches the provider. Otherwise a successful answer whose usage the provider reported is kept
for the product's TTL: a JSON body byte for byte, a stream as the event stream the client
received (replayed whole, a valid stream of the same events). Every response in play says
`x-meterproxy-cache: hit|miss|bypass`.
"""

import json
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from mitmproxy import ctx, http

from addons.calls import call_of
from addons.ledger import Ledger
from meterproxy.cache import OPT_IN_HEADER, cache_key, directive
from meterproxy.database import LedgerUnavailable
from meterproxy.store import Store, iso
from meterproxy.usage import Usage, UsageSource
from pricing.money import money_text
from pricing.prices import PriceNotFound


class ResponseCache:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def load(self, loader):
        loader.add_option("meterproxy_cache_max_bytes", int, 256 * 1024 * 1024, "Size cap of the response cache.")

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Waits (returns the lookup to await) only where the cache is read."""
        call = call_of(flow)
        if call is None or call.refusal or not call.opened or call.request_body is None:
            return None
        if call.principal.merchant_id is None:
            return None  # a proxied call with the client's own key: whose answers would it share?
        rule = directive(call.principal.cache_ttl, flow.request.headers, call.fresh)
        if rule is None:
            return None
        call.cache_status = "bypass"
        if not (rule.read or rule.write):
            return None
        key = cache_key(call.principal.merchant_id, call.target.provider.name, call.endpoint, call.request_body)
        if rule.read:
            return self._look_up(flow, call, key, rule.ttl)
        _missed(call, key, rule.ttl)
        return None

    async def _look_up(self, flow: http.HTTPFlow, call, key: str, ttl: int) -> None:
        now = iso(datetime.now(UTC))
        try:
            entry = await self.ledger.store_thread.call(lambda store: store.cached(key, now), writes=True)
        except LedgerUnavailable:  # a miss: the admission that follows answers 503
            entry = None
        if entry is None:
            _missed(call, key, ttl)
            return
        call.cache_hit, call.cache_status = True, "hit"
        usage = entry["usage"]
        call.dialect.usage = Usage(
            **{
                **usage,
                "input_seconds": Decimal(usage["input_seconds"]),
                "output_seconds": Decimal(usage["output_seconds"]),
            }
        )
        call.dialect.final = True
        flow.response = http.Response.make(200, entry["body"], {"content-type": entry["content_type"]})

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is not None and call.cache_status:
            flow.response.headers[OPT_IN_HEADER] = call.cache_status

    def response(self, flow: http.HTTPFlow) -> None:
        """Keep only a whole, successful answer whose usage the provider reported."""
        call = call_of(flow)
        if call is None or not call.cache_entry or not 200 <= flow.response.status_code < 300:
            return
        usage = call.dialect.usage if call.dialect else None
        if usage is None or not call.dialect.final or usage.source is not UsageSource.PROVIDER:
            return
        if call.meter is not None:
            if call.meter.tap is None or not call.meter.readable:
                return  # too large, or not read
            body = b"".join(call.meter.tap)
        elif flow.response.stream:
            return  # passed through unread
        else:
            body = flow.response.raw_content
        now = datetime.now(UTC)
        columns = {name: value for name, value in usage.columns().items() if name != "usage_source"}
        entry = {
            "key": call.cache_entry["key"],
            "merchant_id": call.principal.merchant_id,
            "product_id": call.principal.product_id,
            "provider": call.target.provider.name,
            "endpoint": call.endpoint,
            "content_type": flow.response.headers.get("content-type", "application/json"),
            "body": body,
            "usage": json.dumps(columns),
            "created_at": iso(now),
            "expires_at": iso(now + timedelta(seconds=call.cache_entry["ttl"])),
        }
        prices, tariff, limit = self.ledger.prices, call.tariff(call.model), ctx.options.meterproxy_cache_max_bytes

        def keep(store: Store) -> None:
            try:
                cost = tariff.charge(usage, now, prices).provider_cost
            except PriceNotFound:
                return  # never charged, so never kept
            store.keep({**entry, "provider_cost": money_text(cost)}, limit)

        self.ledger.store_thread.submit(keep, writes=True)


def _missed(call, key: str, ttl: int) -> None:
    """Not answered from the cache: the answer is to be kept under `key`, if it ends well."""
    call.cache_status = "miss"
    call.cache_entry = {"key": key, "ttl": ttl}
