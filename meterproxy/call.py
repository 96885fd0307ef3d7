"""One metered call's state, from routing to its ledger row, carried on the flow."""

from dataclasses import dataclass, field

from meterproxy.dialects import Dialect
from meterproxy.errors import GatewayError
from meterproxy.providers import Target
from meterproxy.store import Principal
from meterproxy.stream import StreamMeter
from meterproxy.token import ForwardToken, KeyMode
from pricing.fees import Tariff


@dataclass
class Call:
    request_id: str
    method: str = "POST"
    proxied: bool = False  # sent to the provider's host through the proxy, not to the gateway
    target: Target | None = None
    target_host: str | None = None  # as asked for, kept for the audit even when refused
    metadata: dict[str, str] = field(default_factory=dict)
    token: ForwardToken | None = None
    principal: Principal | None = None
    model: str | None = None
    request_body: dict | None = None
    stream: bool = False
    dialect: Dialect | None = None
    meter: StreamMeter | None = None  # the tee of a streamed response
    drop_usage_event: bool = False  # the gateway asked for the stream's usage event itself
    refusal: GatewayError | None = None
    opened: bool = False  # its pending row is on disk
    key: str | None = field(default=None, repr=False)  # the provider key sent upstream
    attempts: int = 1
    upstream_failure: GatewayError | None = None  # the gateway gave up on the provider (502/504)
    timeout: str | None = None  # why the gateway cut the provider off
    provider_status: int | None = None  # the status of an answer the provider then cut short
    retryable_failure: bool = False  # the provider failed before answering at all
    watchdog: object = field(default=None, repr=False)  # the timer for a silent provider: first byte, then a stall
    rate_headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the client
    fresh: bool = False  # ?fresh=1: skip the cache's lookup
    cache_status: str | None = None  # hit, miss or bypass, when the cache is in play
    cache_hit: bool = False
    cache_entry: dict | None = None  # where a miss's answer is to be kept

    def __deepcopy__(self, memo: dict) -> dict:
        """What a copy of the flow keeps of a call in flight (mitmproxy copies a flow's metadata
        to save it, `save_stream_file`): plain data, never the live state (timers, the stream)."""
        return {"request_id": self.request_id, "status": "pending"}

    @property
    def key_mode(self) -> KeyMode:
        """Without a forward token (a proxied call with the client's own key) only metering."""
        return self.token.key_mode if self.token else KeyMode.UNMANAGED

    def tariff(self, model: str | None) -> Tariff:
        """A cached answer costs the provider nothing; the product's fees still apply."""
        return Tariff(self.target.provider.price_provider, model, self.principal.fees, self.key_mode, self.cache_hit)

    @property
    def endpoint(self) -> str | None:
        return None if self.target is None else f"{self.method} {self.target.url.partition('?')[0]}"
