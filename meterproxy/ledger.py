"""The ledger row of a call: what is written before forwarding and what completes it."""

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from meterproxy.call import Call
from meterproxy.errors import GatewayError
from meterproxy.store import iso
from meterproxy.token import KeyMode
from meterproxy.usage import Usage
from pricing.fees import Tariff
from pricing.money import ZERO, money_text
from pricing.prices import PriceBook, PriceNotFound

MAX_ERROR_MESSAGE = 1000
log = logging.getLogger(__name__)


def opening_row(call: Call, created_at: datetime) -> dict:
    """The `pending` row: everything known before the call goes upstream."""
    principal = call.principal
    return {
        "request_id": call.request_id,
        "provider": call.target.provider.name,
        "endpoint": call.endpoint,
        "key_mode": call.key_mode.value,
        "model": call.model,
        "connection_id": principal.connection_id,
        "product_id": principal.product_id,
        "merchant_id": principal.merchant_id,
        "wallet_id": principal.wallet_id,
        "metadata": call.metadata,
        "stream": call.stream,
        "cache_hit": False,
        "attempts": 1,
        "created_at": iso(created_at),
    }


@dataclass
class Outcome:
    """How the exchange with the provider ended, as the proxy saw it."""

    started: datetime
    first_byte: datetime | None
    ended: datetime
    upstream_status: int | None = None  # None: no response came
    error: str | None = None  # transport failure, client gone, stream cut…
    streamed: bool = False  # the response went to the client as it came, not whole at its end
    client_left: bool = False  # the error is the client's leaving, after the provider had answered


def closing_fields(call: Call, outcome: Outcome, prices: PriceBook) -> tuple[dict, Decimal]:
    """The completing update and the wallet debit.

    A streamed response is charged for what it delivered, even if the stream was cut or the
    client left (estimated where the provider did not report usage), and so is an answer whose
    client left while it came; an upstream error status, no response at all, an answer the
    provider (or the gateway's timeout) cut short before the client got any of it, or a model
    with no price is an `error` row that charges nothing.
    """
    model = (call.dialect.reply.model if call.dialect else None) or call.model
    fields = {
        "upstream_status": outcome.upstream_status,
        "provider_response_id": call.dialect.reply.response_id if call.dialect else None,
        "completed_at": iso(outcome.ended),
        "latency_ms": _ms(outcome.started, outcome.ended),
        "ttfb_ms": _ms(outcome.started, outcome.first_byte) if outcome.first_byte else None,
        "model": model,
        "attempts": 0 if call.cache_hit else call.attempts,
        "cache_hit": call.cache_hit,
    }
    error = _failure(call, outcome)
    if error is not None:
        return {**fields, **failed(error)}, ZERO
    try:
        usage = call.dialect.metered_usage(call.request_body) if call.dialect else Usage()
        price_name = prices.model_to_price(call.target.provider.price_provider, model, call.model)
        priced_fields, wallet_cost = priced(call.tariff(price_name), usage, outcome.started, prices)
    except Exception as error:  # a defect, or input nobody foresaw: the row is completed all the same
        log.exception("could not meter %s", call.request_id)
        return {**fields, **failed(f"the gateway could not meter the answer ({type(error).__name__})")}, ZERO
    return {**fields, **priced_fields}, wallet_cost


def needs_estimate(call: Call, outcome: Outcome) -> bool:
    """Whether `closing_fields` will estimate the usage with the tokenizer (which can take long
    for a big prompt or a long cut stream)."""
    return call.dialect is not None and not call.dialect.reported and _failure(call, outcome) is None


def priced(tariff: Tariff, usage: Usage, at: datetime, prices: PriceBook) -> tuple[dict, Decimal]:
    """The usage, status and costs of a row, and what the wallet pays: `completed` with exact
    costs, or `error` for a model with no price."""
    try:
        charge = tariff.charge(usage, at, prices)
    except PriceNotFound as missing:
        return {**usage.columns(), **failed(str(missing))}, ZERO
    costs = {name: money_text(getattr(charge, name)) for name in ("total_cost", "wallet_cost", "merchant_cost")}
    return {**usage.columns(), "status": "completed", "error_message": None, **costs}, charge.wallet_cost


def failed(error: str) -> dict:
    zero = money_text(ZERO)
    return {
        "status": "error",
        "error_message": error[:MAX_ERROR_MESSAGE],
        "total_cost": zero,
        "wallet_cost": zero,
        "merchant_cost": zero,
    }


def _failure(call: Call, outcome: Outcome) -> str | None:
    if call.upstream_failure is not None:
        return call.upstream_failure.message
    status = outcome.upstream_status
    if status is None:
        return outcome.error or "no response from the provider"
    if outcome.error and not (outcome.streamed or outcome.client_left):
        return f"the answer was cut short: {outcome.error}"  # by the provider, or the gateway's timeout
    if status >= 400:
        message = call.dialect.reply.error if call.dialect else None
        return f"provider answered HTTP {status}" + (f": {message}" if message else "")
    return None


# What in a request body names input that the body does not carry: a stored conversation
# (Responses' `previous_response_id`, `conversation`), Gemini's cached content, files by id, URL
# or URI. Such a prompt is not bounded by the body's size.
_PROMPT_ELSEWHERE = re.compile(
    rb'"(?:previous_response_id|conversation|cachedContent|cached_content|file_id|file_url|fileUri|file_uri)"'
    rb'\s*:\s*(?!null)|"type"\s*:\s*"url"'
)


def require_price(call: Call, prices: PriceBook) -> None:
    """Refuse (403 `model_not_priced`) a call to a model with no price when anyone would be
    charged for it: with a managed key, or with a product that has fees. Served, it would be an
    `error` row that charges nothing, a call the merchant gives away. Metering only passes."""
    fees = call.principal.fees
    if call.model is None or fees is None or (call.key_mode is KeyMode.UNMANAGED and not fees.charges_fees):
        return
    provider = call.target.provider.price_provider
    if not prices.has_price(provider, call.model):
        raise GatewayError(
            403,
            f"model {call.model!r} has no price for provider {provider!r}, so it cannot be charged: use a priced"
            " model, or ask the gateway's operator to price it (pricing/overrides.toml)",
            "model_not_priced",
        )


def worst_case_hold(call: Call, body: bytes, prices: PriceBook, at: datetime) -> Decimal:
    """What to hold on the wallet before forwarding: the wallet's part of the request's
    worst-case cost (prompt plus its output limit), or the product's cap when it sets no limit;
    at least the cap when the prompt is partly elsewhere."""
    fees = call.principal.fees
    if call.principal.wallet_id is None or fees is None or call.dialect is None:
        return ZERO
    worst = call.dialect.worst_case(call.request_body or {}, len(body))
    if worst is None:
        return fees.request_cap
    try:
        hold = call.tariff(call.model).charge(worst, at, prices, upper_bound=True).wallet_cost
    except PriceNotFound:  # such a call ends as an error row that charges nothing
        return ZERO
    return max(hold, fees.request_cap) if _PROMPT_ELSEWHERE.search(body) else hold


def _ms(start: datetime, end: datetime) -> int:
    return round((end - start).total_seconds() * 1000)


def from_timestamp(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def describe(row: dict) -> str:
    """One line for a person looking at the flow (mitmweb's comment), what matters first:
    `$0.00000435 gpt-4o-mini 9→5 · openai · managed · req_…`."""
    model = row["model"] or "(no model)"
    whose = f"{row['provider']} · {row['key_mode']} · {row['request_id']}"
    if row["status"] == "error":
        return f"$0 {model} error: {row['error_message']} · {whose}"
    estimated = " · estimated" if row.get("usage_source") == "estimated" else ""
    return (
        f"${plain_dollars(row['total_cost'])} {model} {row['input_tokens']}→{row['output_tokens']}{estimated} · {whose}"
    )


def plain_dollars(amount: str) -> str:
    """An exact amount without its trailing zeros: `"0.0000043500"` is `0.00000435`."""
    return f"{Decimal(amount).normalize():f}" if Decimal(amount) else "0"
