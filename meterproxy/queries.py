"""Reading the ledger: filtered, paginated listings and rollups (SPEC §1.4, §8).

Backend-agnostic (meterproxy/database.py): the same calls read a SQLite or a PostgreSQL ledger,
and give rows in one shape (money as exact text, times as ISO 8601 UTC). Filters become one
parameterised WHERE clause; pages are keyed on (created_at, request_id),
newest first, so a cursor stays valid while rows are added. Rollups add costs as Decimal in
Python: SQLite would add the 10-decimal strings as floats.
"""

import base64
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from meterproxy.database import Database
from pricing.money import ZERO, money_text

COSTS = ("total_cost", "wallet_cost", "merchant_cost")
FIGURES = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_characters",
    "output_characters",
)
GROUPINGS = ("connection", "product", "model", "day")  # and "metadata.<key>"


@dataclass
class LedgerFilter:
    """Which rows: always one merchant's, narrowed by any of the other fields."""

    merchant_id: str | None
    connection_id: str | None = None
    product_id: str | None = None
    model: str | None = None
    status: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    created_after: str | None = None  # ISO 8601, inclusive
    created_before: str | None = None  # ISO 8601, exclusive

    def where(self, db: Database) -> tuple[str, list]:
        """One parameterised WHERE clause, in the backend's dialect where it has one (JSON)."""
        clauses, params = [], []
        for column in ("merchant_id", "connection_id", "product_id", "model", "status"):
            if getattr(self, column) is not None:
                clauses.append(f"{column} = ?")
                params.append(getattr(self, column))
        for key, value in self.metadata.items():
            field, field_params = db.json_text("metadata", key)
            clauses.append(f"{field} = ?")
            params += [*field_params, value]
        if self.created_after:
            clauses.append("created_at >= ?")
            params.append(self.created_after)
        if self.created_before:
            clauses.append("created_at < ?")
            params.append(self.created_before)
        return " and ".join(clauses) or "1 = 1", params


def encode_cursor(row: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps([row["created_at"], row["request_id"]]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    """Raises ValueError for a cursor this module did not make."""
    try:
        created_at, request_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError) as error:
        raise ValueError("invalid cursor") from error
    if not isinstance(created_at, str) or not isinstance(request_id, str):
        raise ValueError("invalid cursor")
    return created_at, request_id


def page(db: Database, where: LedgerFilter, cursor: str | None, limit: int) -> tuple[list[dict], str | None]:
    """One page of rows, newest first, and the cursor of the next page (None on the last)."""
    clause, params = where.where(db)
    if cursor:
        clause += " and (created_at, request_id) < (?, ?)"
        params += list(decode_cursor(cursor))
    rows = list(db["requests"].rows_where(clause, params, order_by="created_at desc, request_id desc", limit=limit + 1))
    return rows[:limit], encode_cursor(rows[limit - 1]) if len(rows) > limit else None


def matching(db: Database, where: LedgerFilter) -> Iterator[dict]:
    clause, params = where.where(db)
    return db["requests"].rows_where(clause, params)


def group_key(by: str) -> Callable[[dict], str | None]:
    """How rows are grouped: by connection, product, model, day (UTC) or `metadata.<key>`."""
    if by.startswith("metadata."):
        key = by.removeprefix("metadata.")
        return lambda row: json.loads(row["metadata"] or "{}").get(key)
    columns = {"connection": "connection_id", "product": "product_id", "model": "model"}
    if by == "day":
        return lambda row: row["created_at"][:10]
    if by not in columns:
        raise ValueError(f"cannot group by {by!r}: use one of {', '.join(GROUPINGS)} or metadata.<key>")
    return lambda row: row[columns[by]]


def rollup(rows: Iterable[dict], by: str) -> list[dict]:
    """Requests, usage figures and exact costs per group, in group order. `by` may name
    several groupings, comma-separated (`day,model`: each day's spend by model)."""
    names = by.split(",")
    keys = [group_key(name) for name in names]
    groups: dict = {}
    for row in rows:
        totals = groups.setdefault(
            tuple(key_of(row) for key_of in keys),
            {"requests": 0, **dict.fromkeys(FIGURES, 0), **dict.fromkeys(COSTS, ZERO)},
        )
        totals["requests"] += 1
        for name in FIGURES:
            totals[name] += row[name] or 0
        for name in COSTS:
            totals[name] += Decimal(row[name] or 0)
    return [
        {**dict(zip(names, key)), **totals, **{name: money_text(totals[name]) for name in COSTS}}
        for key, totals in sorted(groups.items(), key=lambda item: [(part is None, part or "") for part in item[0]])
    ]


def wallet_ids(db: Database, merchant_id: str | None) -> list[str]:
    """The wallets a merchant's connections draw on (every wallet for None, the operator)."""
    if merchant_id is None:
        return [wallet_id for (wallet_id,) in db.execute("SELECT id FROM wallets ORDER BY id")]
    query = "SELECT DISTINCT wallet_id FROM connections WHERE merchant_id = ? ORDER BY wallet_id"
    return [wallet_id for (wallet_id,) in db.execute(query, [merchant_id])]


def names(db: Database, merchant_id: str | None) -> dict[str, str]:
    """What a person calls a merchant, its products and its connections (a connection by its
    wallet); every merchant's for None, the operator."""
    mine, params = ("WHERE {}merchant_id = ?", [merchant_id]) if merchant_id else ("", [])
    merchants = db.execute(f"SELECT id, name FROM merchants {'WHERE id = ?' if merchant_id else ''}", params)
    products = db.execute(f"SELECT id, name FROM products {mine.format('')}", params)
    connections = db.execute(
        "SELECT connections.id, wallets.name FROM connections JOIN wallets ON wallets.id = connections.wallet_id "
        + mine.format("connections."),
        params,
    )
    return {row_id: name for row_id, name in [*merchants, *products, *connections]}


def cache_stats(db: Database, merchant_id: str | None = None) -> list[dict]:
    """Per product: answers kept, their hits, the share of the product's completed requests
    answered from the cache, and the provider cost those hits saved (exact)."""
    mine, params = ("WHERE merchant_id = ?", [merchant_id]) if merchant_id else ("", [])
    kept: dict = {}
    for product, hits, cost in db.execute(f"SELECT product_id, hits, provider_cost FROM cache_entries {mine}", params):
        totals = kept.setdefault(product, {"entries": 0, "hits": 0, "saved": ZERO})
        totals["entries"] += 1
        totals["hits"] += hits
        totals["saved"] += hits * Decimal(cost)
    served = db.execute(
        "SELECT product_id, COUNT(*), SUM(cache_hit) FROM requests WHERE status = 'completed' "
        f"{'AND merchant_id = ?' if merchant_id else ''} GROUP BY product_id",
        params,
    ).fetchall()
    ratios = {product: (hit or 0) / count for product, count, hit in served if count}
    return [
        {
            "product_id": product,
            "entries": totals["entries"],
            "hits": totals["hits"],
            "hit_ratio": f"{ratios.get(product, 0):.3f}",
            "saved": money_text(totals["saved"]),
        }
        for product, totals in sorted(kept.items(), key=lambda item: item[0] or "")
    ]
