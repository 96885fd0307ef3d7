"""The SQLite database: merchants, products, wallets, connections, the ledger and the audit log.

One file in WAL mode, shared by the gateway (its `LedgerWriter` and `StoreThread`) and the
`meterproxy` admin command. Money is stored as exact 10-decimal strings; secrets only as
SHA-256 hashes (they are 256-bit random, so a plain hash is enough and lookups stay indexed).
"""

import hashlib
import hmac
import json
import secrets
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import sqlite_utils

from meterproxy.errors import GatewayError
from meterproxy.ids import new_id
from meterproxy.limits import ProductLimits
from meterproxy.token import ForwardToken
from pricing.fees import ProductFees
from pricing.money import ZERO, money_text

TOKEN_COLUMNS = {
    "input_tokens": int,
    "output_tokens": int,
    "cached_input_tokens": int,
    "cache_write_tokens": int,
    "reasoning_tokens": int,
    "input_characters": int,
    "output_characters": int,
    "input_seconds": str,
    "output_seconds": str,
}
LEDGER_COLUMNS = {
    "request_id": str,
    "status": str,
    "provider": str,
    "endpoint": str,
    "key_mode": str,
    "model": str,
    "provider_response_id": str,
    "connection_id": str,
    "product_id": str,
    "merchant_id": str,
    "wallet_id": str,
    "metadata": str,
    **TOKEN_COLUMNS,
    "usage_source": str,
    "stream": int,
    "cache_hit": int,
    "attempts": int,
    "upstream_status": int,
    "error_message": str,
    "total_cost": str,
    "wallet_cost": str,
    "merchant_cost": str,
    "created_at": str,
    "completed_at": str,
    "latency_ms": int,
    "ttfb_ms": int,
}


ACCOUNT = {"id": str, "created_at": str}
FEE_COLUMNS = {name: str for name in ProductFees.model_fields}
LIMIT_COLUMNS = {name: int for name in ProductLimits.model_fields}
SCHEMA = {
    "merchants": ({**ACCOUNT, "name": str, "secret_hash": str}, {"pk": "id"}),
    "products": (
        {
            **ACCOUNT,
            "merchant_id": str,
            "name": str,
            "secret_hash": str,
            **FEE_COLUMNS,
            **LIMIT_COLUMNS,
            "cache_ttl": int,
        },
        {"pk": "id", "foreign_keys": [("merchant_id", "merchants")]},
    ),
    "wallets": ({**ACCOUNT, "name": str, "balance": str}, {"pk": "id"}),
    "connections": (
        {**ACCOUNT, "merchant_id": str, "wallet_id": str, "secret_hash": str, "revoked_at": str},
        {"pk": "id", "foreign_keys": [("merchant_id", "merchants"), ("wallet_id", "wallets")]},
    ),
    # `held`: the worst-case cost held on the wallet when the call was admitted. A wallet can
    # spend its balance less what its `pending` rows hold.
    "requests": ({**LEDGER_COLUMNS, "held": str}, {"pk": "request_id"}),
    # Answers kept for the same question (addons/cache.py); one merchant's never reach another.
    "cache_entries": (
        {
            "key": str,
            "merchant_id": str,
            "product_id": str,
            "provider": str,
            "endpoint": str,
            "content_type": str,
            "body": bytes,
            "usage": str,  # the metered usage of the answer, JSON: a hit is metered with it
            "provider_cost": str,  # what the answer cost: each hit saves it
            "created_at": str,
            "expires_at": str,
            "hits": int,
        },
        {"pk": "key"},
    ),
    "audit": (
        {
            "id": int,
            "created_at": str,
            "request_id": str,
            "status": int,
            "code": str,
            "reason": str,
            "client_address": str,
            "target_host": str,
        },
        {"pk": "id"},
    ),
}
INDEXES = (
    ("merchants", ["secret_hash"], True),
    ("products", ["secret_hash"], True),
    ("connections", ["secret_hash"], True),
    ("requests", ["merchant_id", "created_at"], False),
)
# Only the rows in flight: a small index that the hot path keeps hot, for the holds of a wallet
# and for the recovery after a crash.
PENDING_INDEX = "CREATE INDEX IF NOT EXISTS requests_pending ON requests (wallet_id) WHERE status = 'pending'"
# What earlier versions had: a table of holds and an index of every row's status.
OBSOLETE = ("DROP TABLE IF EXISTS holds", "DROP INDEX IF EXISTS idx_requests_status")
MAX_REMEMBERED = 10_000  # principals kept in memory; all are forgotten when there are more
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file keeps when it starts over
RESTART_PATIENCE_MS = 20  # the longest a checkpoint holds writers off, waiting for a reader
INTERRUPTED = "interrupted: the gateway stopped before the call completed"


IDEMPOTENT_FIELDS = (
    "provider",
    "model",
    "connection_id",
    "product_id",
    "input_tokens",
    "output_tokens",
    "input_characters",
    "output_characters",
    "input_seconds",
    "output_seconds",
)


def _figures(row: dict) -> tuple:
    """What a repeated metering-API call must repeat exactly."""
    metadata = row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"] or "{}")
    return (*(str(row[name]) for name in IDEMPOTENT_FIELDS), metadata)


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds, the one time format of the database."""
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """UTC with milliseconds; a time without a zone is taken to be UTC."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


@dataclass(frozen=True)
class Principal:
    """Who a forward token names: a merchant, and a connection, wallet and product unless the
    request is metering-only. No merchant at all for a proxied call with the client's own key."""

    merchant_id: str | None
    connection_id: str | None = None
    wallet_id: str | None = None
    product_id: str | None = None
    fees: ProductFees | None = None
    limits: ProductLimits | None = None
    cache_ttl: int = 0


class Store:
    def __init__(self, path: str | Path, busy_timeout: float = 30, checkpoints: bool = True):
        """`busy_timeout`: seconds to wait for another connection's write lock. `checkpoints`:
        False leaves the WAL's checkpoints (which fsync) to another connection."""
        conn = sqlite3.connect(str(path), timeout=busy_timeout, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across process crashes
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self.db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # the WAL shrinks back when it starts over
        if not checkpoints:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.ensure_schema()
        # What the gateway's writer keeps between transactions: principals by their token's
        # secrets, and each wallet's [balance, held]. Accounts change rarely, and but for the
        # gateway's own holds and debits only through other connections (the admin command):
        # SQLite's data_version tells when another connection has committed, and then all of it
        # is forgotten, as it is when a transaction or savepoint rolls back.
        self._data_version: int | None = None
        self._principals: dict[tuple, Principal] = {}
        self._wallets: dict[str, list[Decimal]] = {}
        # Wallets debited in memory and not yet written: written once each, before a commit
        # (or a savepoint), however many calls of the batch they paid for.
        self._unsettled: set[str] = set()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self, immediate: bool = True):
        """A transaction that, by default, takes the write lock up front, so that it waits for
        other writers (busy_timeout) instead of failing on a lock upgrade. `immediate=False`
        for reading: a consistent snapshot that holds no lock."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            self.forget()
        try:
            yield self
            self._settle()
        except BaseException:
            conn.rollback()
            self.forget()
            raise
        conn.commit()

    @contextmanager
    def savepoint(self):
        """A nested transaction: an exception undoes only what ran inside it."""
        conn = self.db.conn
        self._settle()  # what ran before it stays, whatever happens inside
        conn.execute("SAVEPOINT job")
        try:
            yield self
        except BaseException:
            if conn.in_transaction:  # on some errors (a full disk) SQLite has ended it all itself
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            self.forget()
            raise
        conn.execute("RELEASE job")

    def forget(self) -> None:
        """Drop what is remembered of accounts and wallets: read them again when next needed."""
        self._principals.clear()
        self._wallets.clear()
        self._unsettled.clear()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file, and let the next write start the WAL over.

        A passive checkpoint alone never catches up with a steady stream of writes (frames keep
        coming while it copies), and then the WAL grows without end, and every read with it. So
        the passive copy, which never blocks a writer, is followed by a RESTART, which copies the
        few frames written meanwhile and holds writers off for that moment only (the gateway's
        writer tries again a few milliseconds later). A RESTART also waits for readers of older
        snapshots, and holds writers off while it waits: it is tried only when no reader kept the
        passive copy from finishing, and it gives up after RESTART_PATIENCE_MS."""
        _, frames, copied = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if copied < frames:
            return  # a reader still needs part of the WAL: the next checkpoint tries again
        self.db.execute(f"PRAGMA busy_timeout={RESTART_PATIENCE_MS}")
        try:
            self.db.execute("PRAGMA wal_checkpoint(RESTART)")
        finally:
            self.db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")

    def ensure_schema(self) -> None:
        """Create the tables, or bring an older database's tables up to this schema."""
        for table, (columns, extra) in SCHEMA.items():
            if self.db[table].exists():
                missing = {name: kind for name, kind in columns.items() if name not in self.db[table].columns_dict}
                for name, kind in missing.items():
                    self.db[table].add_column(name, kind)
            else:
                self.db[table].create(columns, **extra)
        for table, columns, unique in INDEXES:
            self.db[table].create_index(columns, unique=unique, if_not_exists=True)
        for statement in (PENDING_INDEX, *OBSOLETE):
            self.db.execute(statement)

    # --- administration -------------------------------------------------------------------

    def create_merchant(self, name: str) -> tuple[dict, str]:
        return self._create("merchants", "mer", {"name": name}, secret_prefix="msk")

    def create_product(
        self, merchant_id: str, name: str, fees: ProductFees, limits: ProductLimits | None = None, cache_ttl: int = 0
    ) -> tuple[dict, str]:
        """`cache_ttl`: seconds the product keeps answers for the same question (0: no cache)."""
        self._require("merchants", merchant_id)
        limits = limits or ProductLimits()
        fields = {"merchant_id": merchant_id, "name": name, **fees.model_dump(mode="json"), **limits.model_dump()}
        fields["cache_ttl"] = cache_ttl
        return self._create("products", "prd", fields, secret_prefix="psk")

    def create_wallet(self, name: str, balance: Decimal = ZERO) -> dict:
        return self._create("wallets", "wal", {"name": name, "balance": money_text(balance)})[0]

    def top_up(self, wallet_id: str, amount: Decimal) -> Decimal:
        with self.transaction():
            balance = self.wallet_balance(wallet_id) + amount
            self.db["wallets"].update(wallet_id, {"balance": money_text(balance)})
        self.forget()
        return balance

    def wallet_balance(self, wallet_id: str) -> Decimal:
        found = self.db.execute("SELECT balance FROM wallets WHERE id = ?", [wallet_id]).fetchone()
        if found is None:
            raise KeyError(f"no wallet {wallet_id}")
        return Decimal(found[0])

    def held(self, wallet_id: str) -> Decimal:
        """What the wallet's requests in flight hold."""
        query = "SELECT held FROM requests WHERE wallet_id = ? AND status = 'pending'"
        return sum((Decimal(amount) for (amount,) in self.db.execute(query, [wallet_id]) if amount), ZERO)

    def wallet(self, wallet_id: str) -> dict:
        """The wallet with what it holds for requests in flight and what it can still spend."""
        wallet, held = self._require("wallets", wallet_id), self.held(wallet_id)
        return {**wallet, "held": money_text(held), "available": money_text(Decimal(wallet["balance"]) - held)}

    def create_connection(self, merchant_id: str, wallet_id: str) -> tuple[dict, str]:
        self._require("merchants", merchant_id)
        self._require("wallets", wallet_id)
        fields = {"merchant_id": merchant_id, "wallet_id": wallet_id, "revoked_at": None}
        return self._create("connections", "con", fields, secret_prefix="csk")

    def _create(
        self, table: str, id_prefix: str, fields: dict, secret_prefix: str | None = None
    ) -> tuple[dict, str | None]:
        """Insert an account row with a new id and, if it has one, a new secret: returned
        here once, stored only hashed."""
        row = {"id": new_id(id_prefix), **fields, "created_at": utc_now()}
        secret = new_secret(secret_prefix) if secret_prefix else None
        if secret:
            row["secret_hash"] = hash_secret(secret)
        with self.transaction():
            self.db[table].insert(row)
        self.forget()
        return row, secret

    def revoke_connection(self, connection_id: str) -> None:
        self._require("connections", connection_id)
        with self.transaction():
            self.db["connections"].update(connection_id, {"revoked_at": utc_now()})
        self.forget()

    def _require(self, table: str, row_id: str) -> dict:
        try:
            return self.db[table].get(row_id)
        except sqlite_utils.db.NotFoundError:
            raise KeyError(f"no {table[:-1]} {row_id}") from None

    # --- the gateway's side (called in the writer's transactions) -------------------------------
    # `open_request` and `complete_request` each write with one statement, after every check
    # that can refuse (debits are written at commit): the writer runs the ledger's jobs, which
    # call them, without savepoints, since one that fails has written nothing.

    def authorize(self, token: ForwardToken) -> Principal:
        """The principal a token's secrets name (401 if none), remembered by them (the decoded
        tokens themselves are kept too, by `decode_token`)."""
        key = (token.secret_key, token.connection_secret, token.product_secret)
        principal = self._principals.get(key)
        if principal is None:
            merchant = self.merchant(token.secret_key)
            principal = self.principal(merchant["id"], token.connection_secret, token.product_secret)
            if len(self._principals) >= MAX_REMEMBERED:
                self._principals.clear()
            self._principals[key] = principal
        return principal

    def merchant(self, secret_key: str) -> dict:
        merchant = self._by_secret("merchants", secret_key)
        if merchant is None:
            raise GatewayError(401, "unknown secret key", "invalid_secret_key")
        return merchant

    def principal(self, merchant_id: str, connection_secret: str | None, product_secret: str | None) -> Principal:
        """The merchant's connection (not revoked) and product that the secrets name; neither
        for metering only."""
        if connection_secret is None and product_secret is None:
            return Principal(merchant_id=merchant_id)
        connection = self._by_secret("connections", connection_secret or "", merchant_id)
        if connection is None or connection["revoked_at"]:
            raise GatewayError(401, "unknown or revoked connection", "invalid_connection")
        product = self._by_secret("products", product_secret or "", merchant_id)
        if product is None:
            raise GatewayError(401, "unknown product", "invalid_product")
        fees = ProductFees.model_validate({name: product[name] for name in FEE_COLUMNS})
        limits = ProductLimits.model_validate({name: product[name] or 0 for name in LIMIT_COLUMNS})
        ids = (merchant_id, connection["id"], connection["wallet_id"], product["id"])
        return Principal(*ids, fees, limits, product["cache_ttl"] or 0)

    def _by_secret(self, table: str, secret: str, merchant_id: str | None = None) -> dict | None:
        """The row a secret names, if it belongs to `merchant_id` (when given)."""
        digest = hash_secret(secret)
        cursor = self.db.execute(f"SELECT * FROM {table} WHERE secret_hash = ? LIMIT 1", [digest])
        found = cursor.fetchone()
        row = None if found is None else dict(zip([column[0] for column in cursor.description], found))
        # The lookup compares hashes of 256-bit secrets, which tells a timing attacker nothing
        # about any secret; the comparison here is constant-time all the same.
        if row is None or not hmac.compare_digest(row["secret_hash"], digest):
            return None
        return row if merchant_id is None or row["merchant_id"] == merchant_id else None

    def open_request(self, row: dict, hold: Decimal) -> None:
        """Hold the request's worst-case cost on its wallet and write its `pending` row, before
        the call goes upstream; refuse (402) when the wallet's available balance cannot cover it."""
        wallet_id = row.get("wallet_id")
        row = {**row, "status": "pending", "metadata": json.dumps(row.get("metadata") or {})}
        if wallet_id:
            figures = self._wallet_figures(wallet_id)
            if figures[0] - figures[1] < hold:
                raise GatewayError(402, "wallet balance cannot cover this request", "insufficient_balance")
            row["held"] = money_text(hold)
        self._insert("requests", row)
        if wallet_id:
            figures[1] += Decimal(row["held"])

    def complete_request(self, request_id: str, fields: dict, wallet_id: str | None, wallet_cost: Decimal) -> None:
        """Finish the row, release its hold and debit the wallet, in one transaction."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        query = f"UPDATE requests SET {assignments} WHERE request_id = ? RETURNING held"
        released = self.db.conn.execute(query, [*fields.values(), request_id]).fetchone()
        # Wallet figures not remembered are read again, without this row, which is not pending now.
        if released and released[0] and wallet_id in self._wallets:
            self._wallets[wallet_id][1] -= Decimal(released[0])
        if wallet_id and wallet_cost:
            self._debit(wallet_id, wallet_cost)

    def _wallet_figures(self, wallet_id: str) -> list[Decimal]:
        """The wallet's [balance, held], remembered; the caller updates it with what it writes."""
        figures = self._wallets.get(wallet_id)
        if figures is None:
            figures = self._wallets[wallet_id] = [self.wallet_balance(wallet_id), self.held(wallet_id)]
        return figures

    def _insert(self, table: str, row: dict) -> None:
        """A plain INSERT: the gateway's hot path, where the table's shape is known."""
        columns = ", ".join(row)
        marks = ", ".join("?" * len(row))
        self.db.conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))

    def _debit(self, wallet_id: str, amount: Decimal) -> None:
        """In memory; written by `_settle`, within the same transaction."""
        figures = self._wallet_figures(wallet_id)
        figures[0] = Decimal(money_text(figures[0] - amount))
        self._unsettled.add(wallet_id)

    def _settle(self) -> None:
        for wallet_id in self._unsettled:
            balance = money_text(self._wallets[wallet_id][0])
            self.db.conn.execute("UPDATE wallets SET balance = ? WHERE id = ?", [balance, wallet_id])
        self._unsettled.clear()

    def record_usage(self, row: dict, wallet_id: str | None, wallet_cost: Decimal) -> tuple[dict, bool]:
        """A finished row for usage metered elsewhere, charged at once; idempotent on its
        request_id. Returns the row and whether it was created now."""
        existing = self.request(row["request_id"])
        if existing is not None:
            if existing["merchant_id"] != row["merchant_id"] or _figures(existing) != _figures(row):
                raise GatewayError(409, "request_id was already used for other figures", "request_id_conflict")
            return existing, False
        if wallet_id:
            balance, held = self._wallet_figures(wallet_id)
            if balance - held < wallet_cost:
                raise GatewayError(402, "wallet balance cannot cover this request", "insufficient_balance")
        self.db["requests"].insert({**row, "metadata": json.dumps(row["metadata"])})
        if wallet_id and wallet_cost:
            self._debit(wallet_id, wallet_cost)
        return self.request(row["request_id"]), True

    def cached(self, key: str, now: str) -> dict | None:
        """The live entry for `key`, counted as a hit."""
        query = "SELECT content_type, body, usage FROM cache_entries WHERE key = ? AND expires_at > ?"
        found = self.db.execute(query, [key, now]).fetchone()
        if found is None:
            return None
        self.db.execute("UPDATE cache_entries SET hits = hits + 1 WHERE key = ?", [key])
        return {"content_type": found[0], "body": found[1], "usage": json.loads(found[2])}

    def keep(self, entry: dict, max_bytes: int) -> None:
        """Store an answer, replacing an older one for the same question; then drop expired
        entries, and the oldest ones while the cache is over `max_bytes`."""
        stale = "DELETE FROM cache_entries WHERE key = ? OR expires_at <= ?"
        self.db.execute(stale, [entry["key"], entry["created_at"]])
        self._insert("cache_entries", {**entry, "hits": 0})
        total = self.db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM cache_entries").fetchone()[0]
        for key, size in self.db.execute("SELECT key, LENGTH(body) FROM cache_entries ORDER BY created_at").fetchall():
            if total <= max_bytes:
                break
            self.db.execute("DELETE FROM cache_entries WHERE key = ?", [key])
            total -= size

    def purge_cache(self, product_id: str) -> int:
        with self.transaction():
            return self.db.execute("DELETE FROM cache_entries WHERE product_id = ?", [product_id]).rowcount

    def recover(self) -> int:
        """After a crash or a restart: no row stays `pending` and no hold stays open."""
        now = utc_now()
        cursor = self.db.execute(
            "UPDATE requests SET status = 'error', error_message = ?, completed_at = ?, "
            "total_cost = ?, wallet_cost = ?, merchant_cost = ? WHERE status = 'pending'",
            [INTERRUPTED, now, *[money_text(ZERO)] * 3],
        )
        self.forget()
        return cursor.rowcount

    def record_audit(self, entry: dict) -> None:
        self._insert("audit", entry)

    # --- reading -----------------------------------------------------------------------------

    def request(self, request_id: str) -> dict | None:
        rows = self.db["requests"].rows_where("request_id = ?", [request_id])
        return next(iter(rows), None)

    def recent_requests(self, limit: int = 20) -> list[dict]:
        return list(self.db["requests"].rows_where(order_by="created_at desc, request_id desc", limit=limit))
