"""Product fees and the split of a request's cost between wallet and merchant (SPEC §5).

`total_cost` is provider cost plus fees in every key mode. With a managed key the provider
cost is paid by the wallet or the merchant, as the product says; with BYOK the key's owner
pays the provider directly, so the provider cost is in `total_cost` but in neither part; a
metering-only request has no product, hence no fees, and charges nobody.
"""

import enum
from dataclasses import dataclass
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from meterproxy.token import KeyMode
from pricing.money import ZERO, money


class Payer(str, enum.Enum):
    WALLET = "wallet"
    MERCHANT = "merchant"


class ProductFees(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_fee: Decimal = Field(ZERO, ge=0)  # dollars per request
    markup_percent: Decimal = Field(ZERO, ge=0)  # of the provider cost
    provider_cost_payer: Payer = Payer.WALLET

    def fee(self, provider_cost: Decimal) -> Decimal:
        return money(self.fixed_fee + provider_cost * self.markup_percent / 100)


@dataclass(frozen=True)
class Charge:
    provider_cost: Decimal
    fees: Decimal
    wallet_cost: Decimal
    merchant_cost: Decimal

    @property
    def total_cost(self) -> Decimal:
        return self.provider_cost + self.fees


def split_charge(provider_cost: Decimal, fees: ProductFees | None, key_mode: KeyMode) -> Charge:
    """`fees` is None for metering-only requests."""
    provider_cost = money(provider_cost)
    if fees is None:
        return Charge(provider_cost, ZERO, ZERO, ZERO)
    fee = fees.fee(provider_cost)
    if key_mode is KeyMode.UNMANAGED:
        return Charge(provider_cost, fee, fee, ZERO)
    if fees.provider_cost_payer is Payer.MERCHANT:
        return Charge(provider_cost, fee, fee, provider_cost)
    return Charge(provider_cost, fee, provider_cost + fee, ZERO)
