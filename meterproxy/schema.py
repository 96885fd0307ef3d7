"""The ledger's schema and its versioned migrations, on both backends.

Each migration runs once, in order, in the transaction that records its version in
`schema_migrations`; a gateway and the admin command starting together take turns (SQLite's
write lock, a PostgreSQL advisory lock). Version 1 is the schema of the releases before
versioning: a database without `schema_migrations` but with tables is theirs, and version 1 only
adds what such a database may lack (columns earlier releases added as they came).

Columns are named by kind, so that one table definition gives SQLite's (text, as earlier
releases wrote) and PostgreSQL's types (NUMERIC money, timestamptz times).
"""

from meterproxy.limits import ProductLimits
from pricing.fees import ProductFees

PYTHON_TYPES = {"text": str, "integer": int, "money": str, "decimal": str, "time": str, "bytes": bytes}
ADVISORY_LOCK = 7_319_019  # PostgreSQL: the key of the lock migrations take turns with

ACCOUNT = {"id": "text", "created_at": "time"}
FEE_COLUMNS = {name: "text" if name == "provider_cost_payer" else "decimal" for name in ProductFees.model_fields}
LIMIT_COLUMNS = {name: "integer" for name in ProductLimits.model_fields}
USAGE_COLUMNS = {
    "input_tokens": "integer",
    "output_tokens": "integer",
    "cached_input_tokens": "integer",
    "cache_write_tokens": "integer",
    "reasoning_tokens": "integer",
    "input_characters": "integer",
    "output_characters": "integer",
    "input_seconds": "decimal",
    "output_seconds": "decimal",
}
LEDGER_COLUMNS = {
    "request_id": "text",
    "status": "text",
    "provider": "text",
    "endpoint": "text",
    "key_mode": "text",
    "model": "text",
    "provider_response_id": "text",
    "connection_id": "text",
    "product_id": "text",
    "merchant_id": "text",
    "wallet_id": "text",
    "metadata": "text",
    **USAGE_COLUMNS,
    "usage_source": "text",
    "stream": "integer",
    "cache_hit": "integer",
    "attempts": "integer",
    "upstream_status": "integer",
    "error_message": "text",
    "total_cost": "money",
    "wallet_cost": "money",
    "merchant_cost": "money",
    "created_at": "time",
    "completed_at": "time",
    "latency_ms": "integer",
    "ttfb_ms": "integer",
}

# Version 1: the tables as the releases before versioning made them: (columns, primary key,
# foreign keys).
TABLES_V1 = {
    "merchants": ({**ACCOUNT, "name": "text", "secret_hash": "text"}, "id", ()),
    "products": (
        {
            **ACCOUNT,
            "merchant_id": "text",
            "name": "text",
            "secret_hash": "text",
            **FEE_COLUMNS,
            **LIMIT_COLUMNS,
            "cache_ttl": "integer",
        },
        "id",
        (("merchant_id", "merchants"),),
    ),
    "wallets": ({**ACCOUNT, "name": "text", "balance": "money"}, "id", ()),
    "connections": (
        {**ACCOUNT, "merchant_id": "text", "wallet_id": "text", "secret_hash": "text", "revoked_at": "time"},
        "id",
        (("merchant_id", "merchants"), ("wallet_id", "wallets")),
    ),
    # `held`: the worst-case cost held on the wallet when the call was admitted.
    "requests": ({**LEDGER_COLUMNS, "held": "money"}, "request_id", ()),
    # Answers kept for the same question (addons/cache.py); one merchant's never reach another.
    "cache_entries": (
        {
            "key": "text",
            "merchant_id": "text",
            "product_id": "text",
            "provider": "text",
            "endpoint": "text",
            "content_type": "text",
            "body": "bytes",
            "usage": "text",  # the metered usage of the answer, JSON: a hit is metered with it
            "provider_cost": "money",  # what the answer cost: each hit saves it
            "created_at": "time",
            "expires_at": "time",
            "hits": "integer",
        },
        "key",
        (),
    ),
    "audit": (
        {
            "id": "integer",
            "created_at": "time",
            "request_id": "text",
            "status": "integer",
            "code": "text",
            "reason": "text",
            "client_address": "text",
            "target_host": "text",
        },
        "id",
        (),
    ),
}
INDEXES_V1 = (
    "CREATE UNIQUE INDEX IF NOT EXISTS idx_merchants_secret_hash ON merchants (secret_hash)",
    "CREATE UNIQUE INDEX IF NOT EXISTS idx_products_secret_hash ON products (secret_hash)",
    "CREATE UNIQUE INDEX IF NOT EXISTS idx_connections_secret_hash ON connections (secret_hash)",
    "CREATE INDEX IF NOT EXISTS idx_requests_merchant_id_created_at ON requests (merchant_id, created_at)",
    # Only the rows in flight: a small index that the hot path keeps hot.
    "CREATE INDEX IF NOT EXISTS requests_pending ON requests (wallet_id) WHERE status = 'pending'",
)
# What releases before version 1 had: a table of holds and an index of every row's status.
OBSOLETE_V1 = ("DROP TABLE IF EXISTS holds", "DROP INDEX IF EXISTS idx_requests_status")

# Version 2: many gateways on one ledger.
GATEWAYS = {
    "id": "text",
    "host": "text",  # the machine (its name and boot), and the process on it:
    "pid": "integer",
    "process_start": "text",  # the process's start, so that a reused pid is not taken for it
    "started_at": "time",
    "lease_until": "time",  # renewed while the gateway lives; after it, its calls are interrupted
}
BEFORE_UPGRADE = "gw_before_versioning"  # the gateway that left rows pending before version 2
# Every column of `requests` at the latest version, by kind.
REQUEST_COLUMNS = {**TABLES_V1["requests"][0], "gateway_id": "text", "rate_tokens": "integer"}


def _v1_release_schema(db) -> None:
    """The tables of the releases before versioning, and the columns they added over time."""
    for table, (columns, pk, foreign_keys) in TABLES_V1.items():
        if not db.has_table(table):
            db.create(table, columns, pk, foreign_keys)
            continue
        present = db.columns_of(table)
        for name, kind in columns.items():
            if name not in present:
                db.add_column(table, name, kind)
    for statement in (*INDEXES_V1, *OBSOLETE_V1):
        db.execute(statement)


def _v2_many_gateways(db) -> None:
    """Leases, the held total kept on each wallet (taken and checked in one statement), the
    rate-limit counts in the ledger; rows left pending by a release before this one belong to
    a gateway whose lease has expired, for the first gateway to recover."""
    db.create("gateways", GATEWAYS, "id")
    db.add_column("requests", "gateway_id", "text")
    db.add_column("requests", "rate_tokens", "integer")  # counted against the connection's limits
    db.add_column("wallets", "held", "money")
    db.execute("UPDATE wallets SET held = ?", ["0.0000000000"])
    pending = db.rows("SELECT wallet_id, held FROM requests WHERE status = 'pending' AND wallet_id IS NOT NULL")
    for row in pending:
        db.execute("UPDATE wallets SET held = money_add(held, ?) WHERE id = ?", [row["held"] or 0, row["wallet_id"]])
    db.execute("UPDATE requests SET gateway_id = ? WHERE status = 'pending'", [BEFORE_UPGRADE])
    db.execute(
        "CREATE INDEX IF NOT EXISTS requests_rate ON requests (connection_id, created_at) WHERE rate_tokens IS NOT NULL"
    )


MIGRATIONS = (
    (1, "the ledger of the releases before versioning", _v1_release_schema),
    (2, "many gateways: leases, held totals, shared rate limits", _v2_many_gateways),
)
LATEST = MIGRATIONS[-1][0]

PG_FUNCTIONS = (  # the exact money arithmetic SQLite gets from Python (meterproxy/database.py)
    "CREATE OR REPLACE FUNCTION money_add(numeric, numeric) RETURNS numeric "
    "LANGUAGE sql IMMUTABLE AS 'SELECT COALESCE($1, 0) + COALESCE($2, 0)'",
    "CREATE OR REPLACE FUNCTION money_sub(numeric, numeric) RETURNS numeric "
    "LANGUAGE sql IMMUTABLE AS 'SELECT COALESCE($1, 0) - COALESCE($2, 0)'",
    "CREATE OR REPLACE FUNCTION money_covers(numeric, numeric, numeric) RETURNS boolean "
    "LANGUAGE sql IMMUTABLE AS 'SELECT COALESCE($1, 0) - COALESCE($2, 0) >= COALESCE($3, 0)'",
)


def version(db) -> int:
    """The version the database is at: 0 for an empty one, 1 for one of the releases before
    versioning."""
    if db.has_table("schema_migrations"):
        return db.scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") or 0
    return 1 if db.has_table("requests") else 0


def migrate(db) -> list[int]:
    """Bring the database to the latest version; the versions applied now."""
    from meterproxy.database import transaction
    from meterproxy.store import utc_now

    with transaction(db):
        if db.kind == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(?)", [ADVISORY_LOCK])
            for statement in PG_FUNCTIONS:
                db.execute(statement)
        current = version(db)
        applied = []
        if current == 1 and not db.has_table("schema_migrations"):
            _v1_release_schema(db)  # what its own release may not have added yet
        if not db.has_table("schema_migrations"):
            columns = {"version": "integer", "description": "text", "applied_at": "time"}
            db.create("schema_migrations", columns, "version")
            if current == 1:
                _record(db, 1, utc_now())
        for number, _description, step in MIGRATIONS:
            if number > current:
                step(db)
                _record(db, number, utc_now())
                applied.append(number)
    return applied


def _record(db, number: int, now: str) -> None:
    description = dict((n, d) for n, d, _ in MIGRATIONS)[number]
    db.execute(
        "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
        [number, description, now],
    )
