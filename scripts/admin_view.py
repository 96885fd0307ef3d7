"""How the admin command shows what it read: tables for people (money as dollars, names beside
ids, a totals row, empty groups labelled), JSON for programs (exact decimal strings, an object
for one thing and an array for lists). Plain functions, no database."""

import json
from decimal import Decimal

from tabulate import tabulate

from meterproxy.queries import COSTS

# Columns that hold money, in every table the command prints.
MONEY = frozenset({*COSTS, "balance", "held", "available", "fixed_fee", "request_cap", "saved"})
CENT = Decimal("0.01")
ERROR_WIDTH = 60  # the table shows the start of an error message; --json has all of it


def dollars(amount: str | Decimal | None) -> str:
    """`"0.0000043500"` as `$0.00000435`: every significant digit, at least the cents, no float."""
    if amount is None or amount == "":
        return ""
    value = Decimal(amount)
    sign, value = ("-" if value < 0 else ""), abs(value).normalize()
    if value.as_tuple().exponent > -2:
        value = value.quantize(CENT)
    return f"{sign}${value:,f}"


def cell(column: str, value) -> str:
    if column in MONEY:
        return dollars(value)
    if column == "error_message" and value and len(value) > ERROR_WIDTH:
        return value[: ERROR_WIDTH - 1] + "…"
    return "" if value is None else str(value)


def table(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """Rows as a text table of the given columns (all of the first row's by default)."""
    if not rows:
        return "(none)"
    columns = columns or tuple(rows[0])
    shown = [[cell(column, row.get(column)) for column in columns] for row in rows]
    return tabulate(shown, headers=columns, disable_numparse=True)


def as_json(value: dict | list) -> str:
    """Decimals as their exact text (money is already text in the ledger's rows)."""
    return json.dumps(value, indent=2, default=str)


# What a report's group without a key is: rows with no connection or product are metering-only
# calls (or proxied calls with the client's own key); no metadata key: the call was not tagged.
UNKEYED = {"connection": "(metering only)", "product": "(metering only)", "model": "(no model)", "day": "(no day)"}
UNTAGGED = "(untagged)"


def label(by: str, key: str | None) -> str:
    if key is not None:
        return key
    return UNTAGGED if by.startswith("metadata.") else UNKEYED.get(by, "(none)")


def totals(groups: list[dict], by: str, figures: tuple[str, ...]) -> dict:
    """The totals row of a report: the groups' figures and exact costs added up."""
    row = {by: "total"}
    for name in ("requests", *figures):
        row[name] = sum(group[name] for group in groups)
    for name in COSTS:
        row[name] = sum((Decimal(group[name]) for group in groups), Decimal(0))
    return row
