"""The response cache: pay once for the same question (opt-in per product, or per request).

After admission, a request whose answer is kept is answered from the cache: it writes its own
ledger row (`cache_hit`, provider cost 0, the product's fees) and never reaches the provider.
Otherwise a successful, metered, non-streamed answer is kept for the product's TTL. Every
response in play says `x-meterproxy-cache: hit|miss|bypass`.
"""

from datetime import UTC, datetime, timedelta

from mitmproxy import http

from addons.calls import call_of
from addons.ledger import Ledger
from meterproxy.cache import OPT_IN_HEADER, cache_key, directive
from meterproxy.store import iso


class ResponseCache:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal or not call.opened or call.request_body is None or call.stream:
            return
        rule = directive(call.principal.cache_ttl, dict(flow.request.headers.items()), call.fresh)
        if rule is None:
            return
        call.cache_status = "bypass"
        if not (rule.read or rule.write):
            return
        key = cache_key(call.principal.merchant_id or "", call.target.provider.name, call.endpoint, call.request_body)
        if rule.read:
            now = iso(datetime.now(UTC))
            entry = await self.ledger.writer.call(lambda store: store.cached(key, now))
            if entry is not None:
                call.cache_hit, call.cache_status = True, "hit"
                flow.response = http.Response.make(200, entry["body"], {"content-type": entry["content_type"]})
                return
        call.cache_status = "miss"
        call.cache_entry = {"key": key, "ttl": rule.ttl}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is not None and call.cache_status:
            flow.response.headers[OPT_IN_HEADER] = call.cache_status

    def response(self, flow: http.HTTPFlow) -> None:
        """Keep only a successful answer whose usage the provider reported."""
        call = call_of(flow)
        if call is None or not call.cache_entry or flow.response.stream or not 200 <= flow.response.status_code < 300:
            return
        if call.dialect is None or call.dialect.usage is None or not call.dialect.final:
            return
        now = datetime.now(UTC)
        entry = {
            "key": call.cache_entry["key"],
            "merchant_id": call.principal.merchant_id,
            "product_id": call.principal.product_id,
            "provider": call.target.provider.name,
            "endpoint": call.endpoint,
            "content_type": flow.response.headers.get("content-type", "application/json"),
            "body": flow.response.raw_content,
            "created_at": iso(now),
            "expires_at": iso(now + timedelta(seconds=call.cache_entry["ttl"])),
        }
        self.ledger.writer.submit(lambda store: store.keep(entry))
