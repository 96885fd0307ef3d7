"""Product fees and the split of a request's cost between wallet and merchant (SPEC §5).

A product charges a fixed fee per request, a percentage markup on the provider cost and,
optionally, per-unit rates: dollars per million input or output tokens, per million characters
(input and output) and per second (input and output). `total_cost` is provider cost plus fees
in every key mode. With a managed key the provider cost is paid by the wallet or the merchant,
as the product says; with BYOK the key's owner pays the provider directly, so the provider cost
is in `total_cost` but in neither part; a metering-only request has no product, hence no fees,
and charges nobody.
"""

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from meterproxy.token import KeyMode
from meterproxy.usage import Usage
from pricing.money import ZERO, money, money_text

if TYPE_CHECKING:
    from pricing.prices import PriceBook

MILLION = Decimal(1_000_000)
DEFAULT_REQUEST_CAP = Decimal("1")


class Payer(str, enum.Enum):
    WALLET = "wallet"
    MERCHANT = "merchant"


class ProductFees(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_fee: Decimal = Field(ZERO, ge=0)  # dollars per request
    markup_percent: Decimal = Field(ZERO, ge=0)  # of the provider cost
    input_token_rate: Decimal = Field(ZERO, ge=0)  # dollars per million input tokens
    output_token_rate: Decimal = Field(ZERO, ge=0)  # dollars per million output tokens
    character_rate: Decimal = Field(ZERO, ge=0)  # dollars per million characters
    second_rate: Decimal = Field(ZERO, ge=0)  # dollars per second of audio
    provider_cost_payer: Payer = Payer.WALLET
    # The most one request may cost the wallet, held when its body sets no max_tokens.
    request_cap: Decimal = Field(DEFAULT_REQUEST_CAP, ge=0)

    @field_serializer("fixed_fee", "request_cap", when_used="json")
    def _dollars(self, amount: Decimal) -> str:
        return money_text(amount)

    @property
    def charges_fees(self) -> bool:
        """Whether any fee applies: then even a call with the customer's own key is charged."""
        rates = (self.input_token_rate, self.output_token_rate, self.character_rate, self.second_rate)
        return any((self.fixed_fee, self.markup_percent, *rates))

    def fee(self, provider_cost: Decimal, usage: Usage) -> Decimal:
        per_unit = (
            usage.input_tokens * self.input_token_rate
            + usage.output_tokens * self.output_token_rate
            + (usage.input_characters + usage.output_characters) * self.character_rate
        ) / MILLION + (usage.input_seconds + usage.output_seconds) * self.second_rate
        return money(self.fixed_fee + provider_cost * self.markup_percent / 100 + per_unit)


@dataclass(frozen=True)
class Charge:
    provider_cost: Decimal
    fees: Decimal
    wallet_cost: Decimal
    merchant_cost: Decimal

    @property
    def total_cost(self) -> Decimal:
        return self.provider_cost + self.fees


@dataclass(frozen=True)
class Tariff:
    """What a call's usage is priced with: the provider's price for the model, the product's
    fees (None for metering only) and the key mode. A call without a model (listing models,
    say) is not metered and costs nothing."""

    price_provider: str
    model: str | None
    fees: ProductFees | None
    key_mode: KeyMode
    free: bool = False  # no provider cost (an answer from the cache)

    def charge(self, usage: Usage, at: datetime, prices: "PriceBook", upper_bound: bool = False) -> Charge:
        """Raises PriceNotFound for a model priced nowhere. `upper_bound`: at least the charge,
        from cached per-unit rates (for holds)."""
        if self.model is None:
            return split_charge(ZERO, usage, None, self.key_mode)
        if self.free:
            return split_charge(ZERO, usage, self.fees, self.key_mode)
        cost = prices.upper_bound if upper_bound else prices.provider_cost
        return split_charge(cost(self.price_provider, self.model, usage, at), usage, self.fees, self.key_mode)


def split_charge(provider_cost: Decimal, usage: Usage, fees: ProductFees | None, key_mode: KeyMode) -> Charge:
    """`fees` is None for metering-only requests. Each part is rounded to 10 places first, so
    that the parts add up exactly."""
    provider_cost = money(provider_cost)
    if fees is None:
        return Charge(provider_cost, ZERO, ZERO, ZERO)
    fee = fees.fee(provider_cost, usage)
    if key_mode is KeyMode.UNMANAGED:
        return Charge(provider_cost, fee, fee, ZERO)
    if fees.provider_cost_payer is Payer.MERCHANT:
        return Charge(provider_cost, fee, fee, provider_cost)
    return Charge(provider_cost, fee, provider_cost + fee, ZERO)
