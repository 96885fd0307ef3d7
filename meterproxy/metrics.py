"""The gateway's Prometheus metrics: what its calls did and cost, how long they took, how the
ledger keeps up. Counted in the process, once a call's row has committed, so that the counters
add up to the ledger's sums (dollars as floats: Prometheus has no other number).

Each gateway process counts its own calls (several workers: scrape each, or sum them).
"""

from collections.abc import Callable
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TOKEN_KINDS = ("input", "output", "cached_input", "cache_write", "reasoning")
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GATEWAY_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
COMMIT_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1)
MAX_MODELS = 500  # distinct model labels; a model name is the client's to choose: the rest are "other"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._models: set[str] = set()
        self.requests = self._counter(
            "requests", "Calls recorded in the ledger.", "provider", "model", "status", "key_mode"
        )
        self.tokens = self._counter("tokens", "Tokens of the calls recorded, by kind.", "provider", "model", "kind")
        self.cost = self._counter(
            "cost_dollars", "total_cost of the calls recorded, in dollars.", "provider", "model", "key_mode"
        )
        self.cache_hits = self._counter("cache_hits", "Calls answered from the response cache.", "provider", "model")
        self.refusals = self._counter("refusals", "Requests refused before forwarding (audited).", "status", "code")
        self.latency = self._histogram(
            "request_duration_seconds", "From the request to the end of the answer.", SECONDS
        )
        self.ttfb = self._histogram(
            "time_to_first_byte_seconds", "From the request to the answer's first byte.", SECONDS
        )
        self.added = Histogram(
            "meterproxy_gateway_added_seconds",
            "The gateway's own time before forwarding a call: routing, checks, admission.",
            buckets=GATEWAY_SECONDS,
            registry=self.registry,
        )
        self.commits = Histogram(
            "meterproxy_ledger_commit_seconds",
            "How long the ledger writer's transactions take.",
            buckets=COMMIT_SECONDS,
            registry=self.registry,
        )

    def watch(self, queued: Callable[[], int], in_flight: Callable[[], int]) -> None:
        """Gauges read when scraped: the ledger writer's queue and the calls holding wallets."""
        Gauge(
            "meterproxy_ledger_queue_depth", "Ledger jobs waiting for their batch.", registry=self.registry
        ).set_function(queued)
        Gauge(
            "meterproxy_holds_in_flight", "Calls admitted and not completed (their holds).", registry=self.registry
        ).set_function(in_flight)

    def record(self, row: dict) -> None:
        """A call's row has committed as completed or error."""
        provider, model = row["provider"] or "", self._model(row["model"])
        self.requests.labels(provider, model, row["status"], row["key_mode"] or "").inc()
        for kind in TOKEN_KINDS:
            if count := row.get(f"{kind}_tokens"):
                self.tokens.labels(provider, model, kind).inc(count)
        if cost := Decimal(row.get("total_cost") or 0):
            self.cost.labels(provider, model, row["key_mode"] or "").inc(float(cost))
        if row.get("cache_hit"):
            self.cache_hits.labels(provider, model).inc()
        if row.get("latency_ms") is not None:
            self.latency.labels(provider).observe(row["latency_ms"] / 1000)
        if row.get("ttfb_ms") is not None:
            self.ttfb.labels(provider).observe(row["ttfb_ms"] / 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _model(self, model: str | None) -> str:
        if model is None:
            return ""
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                return "other"
            self._models.add(model)
        return model

    def _counter(self, name: str, description: str, *labels: str) -> Counter:
        return Counter(f"meterproxy_{name}", description, labels, registry=self.registry)

    def _histogram(self, name: str, description: str, buckets: tuple) -> Histogram:
        return Histogram(f"meterproxy_{name}", description, ["provider"], buckets=buckets, registry=self.registry)
