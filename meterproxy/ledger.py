"""The ledger row of a call: what is written before forwarding and what completes it."""

from dataclasses import dataclass
from datetime import datetime, timezone

from meterproxy.call import Call
from meterproxy.store import iso
from pricing.fees import split_charge
from pricing.money import ZERO, money_text
from pricing.prices import PriceBook, PriceNotFound

MAX_ERROR_MESSAGE = 1000


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
    upstream_status: int | None = None
    error: str | None = None  # transport failure, client gone, …


def closing_fields(call: Call, outcome: Outcome, prices: PriceBook) -> tuple[dict, object]:
    """The completing update and the wallet debit: `completed` with exact costs, or `error`."""
    fields = {
        "upstream_status": outcome.upstream_status,
        "provider_response_id": call.reply.response_id,
        "completed_at": iso(outcome.ended),
        "latency_ms": _ms(outcome.started, outcome.ended),
        "ttfb_ms": _ms(outcome.started, outcome.first_byte) if outcome.first_byte else None,
        "model": call.reply.model or call.model,
    }
    if call.usage is not None:
        fields.update(call.usage.columns())
    error = outcome.error or _upstream_error(outcome.upstream_status, call.reply.error) or _missing_usage(call)
    wallet_cost = ZERO
    if error is None:
        try:
            provider_cost = prices.provider_cost(
                call.target.provider.price_provider, fields["model"], call.usage, outcome.started
            )
        except PriceNotFound as missing:
            error = str(missing)
        else:
            charge = split_charge(provider_cost, call.principal.fees, call.key_mode)
            wallet_cost = charge.wallet_cost
            fields.update(
                total_cost=money_text(charge.total_cost),
                wallet_cost=money_text(charge.wallet_cost),
                merchant_cost=money_text(charge.merchant_cost),
            )
    if error is None:
        fields.update(status="completed", error_message=None)
    else:
        zero = money_text(ZERO)
        fields.update(status="error", error_message=error[:MAX_ERROR_MESSAGE])
        fields.update(total_cost=zero, wallet_cost=zero, merchant_cost=zero)
    return fields, wallet_cost


def _upstream_error(status: int | None, message: str | None) -> str | None:
    if status is None or status < 400:
        return None
    return f"provider answered HTTP {status}" + (f": {message}" if message else "")


def _missing_usage(call: Call) -> str | None:
    return None if call.usage is not None else "provider reported no usage"


def _ms(start: datetime, end: datetime) -> int:
    return round((end - start).total_seconds() * 1000)


def from_timestamp(value: float) -> datetime:
    return datetime.fromtimestamp(value, timezone.utc)
