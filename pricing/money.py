"""Money is Decimal end to end, stored and reported as strings with 10 decimal places."""

from decimal import ROUND_HALF_UP, Decimal

PLACES = Decimal("0.0000000001")
ZERO = Decimal(0)


def money(value: Decimal | int | str) -> Decimal:
    """Round to the ledger's 10 decimal places (half up, as invoices do)."""
    return Decimal(value).quantize(PLACES, rounding=ROUND_HALF_UP)


def money_text(value: Decimal | int | str) -> str:
    """`"0.0639100000"`: the one text form of money in the ledger and the API."""
    return f"{money(value):f}"
