"""The ledger database: merchants, products, wallets, connections, the ledger, the audit log,
the response cache and the gateways' leases, on SQLite or PostgreSQL (meterproxy/database.py).

Shared by any number of gateways (each a `LedgerWriter` and a `StoreThread`) and the
`meterproxy` admin command. Nothing a gateway remembers can let two gateways spend the same
money: a wallet's available balance is checked by the statement that takes the hold. Principals
are remembered for at most PRINCIPAL_STALENESS, so a revoked connection is refused everywhere
within it. Money is exact (10-decimal text on SQLite, NUMERIC on PostgreSQL); secrets are stored
only as SHA-256 hashes (they are 256-bit random, so a plain hash is enough and lookups stay
indexed).
"""

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlite_utils

from meterproxy.database import PG_TYPES, open_database
from meterproxy.errors import GatewayError
from meterproxy.ids import new_id
from meterproxy.limits import ProductLimits, RateWindow
from meterproxy.schema import FEE_COLUMNS, LIMIT_COLUMNS, REQUEST_COLUMNS, migrate
from meterproxy.token import ForwardToken
from pricing.fees import ProductFees
from pricing.money import ZERO, money_text

MAX_REMEMBERED = 10_000  # principals kept in memory; all are forgotten when there are more
PRINCIPAL_STALENESS = 0.5  # seconds a principal is remembered: a revocation reaches every gateway within it
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file keeps when it starts over
RESTART_PATIENCE_MS = 20  # the longest a checkpoint holds writers off, waiting for a reader
INTERRUPTED = "interrupted: the gateway stopped before the call completed"
INSUFFICIENT = ("wallet balance cannot cover this request", "insufficient_balance")


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
    def __init__(self, target: str | Path, busy_timeout: float = 30, checkpoints: bool = True):
        """`target`: a SQLite file or a PostgreSQL URL. `busy_timeout`: seconds to wait for
        another SQLite connection's write lock. `checkpoints`: False leaves SQLite's WAL
        checkpoints (which fsync) to another connection."""
        self.db = open_database(target, busy_timeout)
        if self.db.kind == "sqlite":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across process crashes
            self._busy_timeout_ms = int(busy_timeout * 1000)
            self.db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # the WAL shrinks back when it starts over
            if not checkpoints:
                self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.migrated = migrate(self.db)
        # Principals by their token's secrets, each with the moment it must be read again.
        self.clock = time.monotonic
        self._principals: dict[tuple, tuple[Principal, float]] = {}

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self, immediate: bool = True):
        """A transaction that, by default, takes SQLite's write lock up front, so that it waits
        for other writers (busy_timeout) instead of failing on a lock upgrade. `immediate=False`
        for reading: a consistent snapshot that holds no lock."""
        self.db.begin(immediate)
        try:
            yield self
        except BaseException:
            self.db.rollback()
            raise
        self.db.commit()

    @contextmanager
    def savepoint(self):
        """A nested transaction: an exception undoes only what ran inside it."""
        self.db.execute("SAVEPOINT job")
        try:
            yield self
        except BaseException:
            if self.db.in_transaction:  # on some errors (a full disk) SQLite has ended it all itself
                self.db.execute("ROLLBACK TO job")
                self.db.execute("RELEASE job")
            raise
        self.db.execute("RELEASE job")

    def forget(self) -> None:
        """Drop the principals remembered: read them again when next needed."""
        self._principals.clear()

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database file, and let the next write start the WAL over.

        A passive checkpoint alone never catches up with a steady stream of writes (frames keep
        coming while it copies), and then the WAL grows without end, and every read with it. So
        the passive copy, which never blocks a writer, is followed by a RESTART, which copies the
        few frames written meanwhile and holds writers off for that moment only (the gateway's
        writer tries again a few milliseconds later). A RESTART also waits for readers of older
        snapshots, and holds writers off while it waits: it is tried only when no reader kept the
        passive copy from finishing, and it gives up after RESTART_PATIENCE_MS."""
        if self.db.kind != "sqlite":
            return
        _, frames, copied = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if copied < frames:
            return  # a reader still needs part of the WAL: the next checkpoint tries again
        self.db.execute(f"PRAGMA busy_timeout={RESTART_PATIENCE_MS}")
        try:
            self.db.execute("PRAGMA wal_checkpoint(RESTART)")
        finally:
            self.db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")

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
        fields = {"name": name, "balance": money_text(balance), "held": money_text(ZERO)}
        return self._create("wallets", "wal", fields)[0]

    def top_up(self, wallet_id: str, amount: Decimal) -> Decimal:
        with self.transaction():
            self._require("wallets", wallet_id)
            self.db.execute("UPDATE wallets SET balance = money_add(balance, ?) WHERE id = ?", [str(amount), wallet_id])
            return self.wallet_balance(wallet_id)

    def wallet_balance(self, wallet_id: str) -> Decimal:
        found = self.db.scalar("SELECT balance FROM wallets WHERE id = ?", [wallet_id])
        if found is None:
            raise KeyError(f"no wallet {wallet_id}")
        return Decimal(found)

    def held(self, wallet_id: str) -> Decimal:
        """What the wallet's requests in flight hold."""
        return Decimal(self.db.scalar("SELECT held FROM wallets WHERE id = ?", [wallet_id]) or 0)

    def wallet(self, wallet_id: str) -> dict:
        """The wallet with what it holds for requests in flight and what it can still spend."""
        wallet = self._require("wallets", wallet_id)
        held = Decimal(wallet["held"] or 0)
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
            self._insert(table, row)
        return row, secret

    def revoke_connection(self, connection_id: str) -> None:
        """Refused by every gateway within PRINCIPAL_STALENESS."""
        self._require("connections", connection_id)
        with self.transaction():
            self.db.execute("UPDATE connections SET revoked_at = ? WHERE id = ?", [utc_now(), connection_id])

    def _require(self, table: str, row_id: str) -> dict:
        try:
            return self.db[table].get(row_id)
        except sqlite_utils.db.NotFoundError:
            raise KeyError(f"no {table[:-1]} {row_id}") from None

    # --- the gateway's side (called in the writer's transactions) -------------------------------
    # Every check that can refuse comes before the first write, and each write that moves money
    # checks and moves it in one statement.

    def authorize(self, token: ForwardToken) -> Principal:
        """The principal a token's secrets name (401 if none), remembered by them for at most
        PRINCIPAL_STALENESS (the decoded tokens themselves are kept too, by `decode_token`)."""
        key = (token.secret_key, token.connection_secret, token.product_secret)
        now = self.clock()
        principal, fresh_until = self._principals.get(key, (None, 0.0))
        if principal is None or now >= fresh_until:
            merchant = self.merchant(token.secret_key)
            principal = self.principal(merchant["id"], token.connection_secret, token.product_secret)
            if len(self._principals) >= MAX_REMEMBERED:
                self._principals.clear()
            self._principals[key] = (principal, now + PRINCIPAL_STALENESS)
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
        row = self.db.row(f"SELECT * FROM {table} WHERE secret_hash = ? LIMIT 1", [digest])
        # The lookup compares hashes of 256-bit secrets, which tells a timing attacker nothing
        # about any secret; the comparison here is constant-time all the same.
        if row is None or not hmac.compare_digest(row["secret_hash"], digest):
            return None
        return row if merchant_id is None or row["merchant_id"] == merchant_id else None

    def rate_window(self, connection_id: str, now: datetime) -> RateWindow:
        """The connection's admissions of the last minute, on every gateway; the connection is
        held until the transaction ends, so that no other gateway counts meanwhile."""
        self.db.lock("connections", connection_id)
        since = iso(now - timedelta(seconds=RateWindow.SECONDS))
        query = (
            "SELECT created_at, rate_tokens FROM requests WHERE connection_id = ? AND rate_tokens IS NOT NULL "
            "AND created_at > ? ORDER BY created_at"
        )
        rows = self.db.rows(query, [connection_id, since])
        return RateWindow([(parse_iso(row["created_at"]).timestamp(), row["rate_tokens"]) for row in rows])

    def open_request(self, row: dict, hold: Decimal) -> None:
        """Hold the request's worst-case cost on its wallet and write its `pending` row, before
        the call goes upstream; refuse (402) when the wallet's available balance cannot cover
        it, checked by the statement that takes the hold, whatever other gateways hold. On
        PostgreSQL the hold and the row are one statement (one round trip)."""
        wallet_id = row.get("wallet_id")
        row = {**row, "status": "pending", "metadata": json.dumps(row.get("metadata") or {})}
        if not wallet_id:
            self._insert("requests", row)
            return
        held = row["held"] = money_text(hold)
        take = "UPDATE wallets SET held = money_add(held, ?) WHERE id = ? AND money_covers(balance, held, ?)"
        if self.db.kind == "postgresql":
            columns = ", ".join(row)
            typed = ", ".join(f"?::{PG_TYPES[REQUEST_COLUMNS[name]]}" for name in row)
            query = f"WITH taken AS ({take} RETURNING id) INSERT INTO requests ({columns}) SELECT {typed} FROM taken"
            if self.db.execute(query, [held, wallet_id, held, *row.values()]).rowcount != 1:
                raise GatewayError(402, *INSUFFICIENT)
            return
        if self.db.execute(take, [held, wallet_id, held]).rowcount != 1:
            raise GatewayError(402, *INSUFFICIENT)
        self._insert("requests", row)

    def complete_request(self, request_id: str, fields: dict, wallet_id: str | None, wallet_cost: Decimal) -> bool:
        """Finish the row, release its hold and debit the wallet, in one transaction (on
        PostgreSQL in one statement). False when the row was no longer pending (another gateway
        took it for interrupted after this one's lease expired): nothing is written or charged."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        finish = f"UPDATE requests SET {assignments} WHERE request_id = ? AND status = 'pending' RETURNING held"
        cost = money_text(wallet_cost)
        if self.db.kind == "postgresql":
            query = (
                f"WITH done AS ({finish}), charged AS (UPDATE wallets SET held = money_sub(wallets.held, done.held), "
                "balance = money_sub(wallets.balance, ?) FROM done WHERE wallets.id = ?) SELECT COUNT(*) FROM done"
            )
            return self.db.scalar(query, [*fields.values(), request_id, cost, wallet_id]) == 1
        released = self.db.execute(finish, [*fields.values(), request_id]).fetchone()
        if released is None:
            return False
        if wallet_id and (released[0] or wallet_cost):
            self.db.execute(
                "UPDATE wallets SET held = money_sub(held, ?), balance = money_sub(balance, ?) WHERE id = ?",
                [str(released[0] or 0), cost, wallet_id],
            )
        return True

    def _insert(self, table: str, row: dict) -> None:
        """A plain INSERT: the gateway's hot path, where the table's shape is known."""
        columns = ", ".join(row)
        marks = ", ".join("?" * len(row))
        self.db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))

    def record_usage(self, row: dict, wallet_id: str | None, wallet_cost: Decimal) -> tuple[dict, bool]:
        """A finished row for usage metered elsewhere, charged at once; idempotent on its
        request_id. Returns the row and whether it was created now."""
        existing = self.request(row["request_id"])
        if existing is not None:
            if existing["merchant_id"] != row["merchant_id"] or _figures(existing) != _figures(row):
                raise GatewayError(409, "request_id was already used for other figures", "request_id_conflict")
            return existing, False
        if wallet_id:
            cost = money_text(wallet_cost)
            charged = self.db.execute(
                "UPDATE wallets SET balance = money_sub(balance, ?) WHERE id = ? AND money_covers(balance, held, ?)",
                [cost, wallet_id, cost],
            )
            if charged.rowcount != 1:
                raise GatewayError(402, *INSUFFICIENT)
        self._insert("requests", {**row, "metadata": json.dumps(row["metadata"])})
        return self.request(row["request_id"]), True

    def cached(self, key: str, now: str) -> dict | None:
        """The live entry for `key`, counted as a hit."""
        query = "SELECT content_type, body, usage FROM cache_entries WHERE key = ? AND expires_at > ?"
        found = self.db.row(query, [key, now])
        if found is None:
            return None
        self.db.execute("UPDATE cache_entries SET hits = hits + 1 WHERE key = ?", [key])
        return {**found, "usage": json.loads(found["usage"])}

    def keep(self, entry: dict, max_bytes: int) -> None:
        """Store an answer, replacing an older one for the same question; then drop expired
        entries, and the oldest ones while the cache is over `max_bytes`."""
        stale = "DELETE FROM cache_entries WHERE key = ? OR expires_at <= ?"
        self.db.execute(stale, [entry["key"], entry["created_at"]])
        self._insert("cache_entries", {**entry, "hits": 0})
        total = self.db.scalar("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM cache_entries")
        for key, size in self.db.execute("SELECT key, LENGTH(body) FROM cache_entries ORDER BY created_at").fetchall():
            if total <= max_bytes:
                break
            self.db.execute("DELETE FROM cache_entries WHERE key = ?", [key])
            total -= size

    def purge_cache(self, product_id: str) -> int:
        with self.transaction():
            return self.db.execute("DELETE FROM cache_entries WHERE product_id = ?", [product_id]).rowcount

    # --- leases: many gateways on one ledger (meterproxy/leases.py) -----------------------------

    def register_gateway(self, gateway: dict) -> None:
        self._insert("gateways", gateway)

    def renew_lease(self, gateway: dict, lease_until: str) -> bool:
        """Extend the gateway's lease; False if its row was gone (its lease had expired and
        another gateway had taken its calls), and then it is registered again."""
        renewed = self.db.execute("UPDATE gateways SET lease_until = ? WHERE id = ?", [lease_until, gateway["id"]])
        if renewed.rowcount == 1:
            return True
        self.register_gateway({**gateway, "lease_until": lease_until})
        return False

    def retire_gateway(self, gateway_id: str) -> int:
        """A gateway's clean stop: whatever it leaves pending is interrupted now."""
        self.db.execute("DELETE FROM gateways WHERE id = ?", [gateway_id])
        return self.recover()

    def recover(self, gone: Callable[[dict], bool] = lambda gateway: False) -> int:
        """Interrupt the calls of gateways that are gone: whose lease has expired, or that
        `gone` says are (a dead process on this machine), or whose row is missing. Their
        pending rows become `error` rows that charge nothing, and their holds are released."""
        now = utc_now()
        for gateway in self.db.rows("SELECT * FROM gateways"):
            if gateway["lease_until"] < now or gone(gateway):
                self.db.execute("DELETE FROM gateways WHERE id = ?", [gateway["id"]])
        interrupted = self.db.rows(
            "UPDATE requests SET status = 'error', error_message = ?, completed_at = ?, "
            "total_cost = ?, wallet_cost = ?, merchant_cost = ? WHERE status = 'pending' "
            "AND (gateway_id IS NULL OR gateway_id NOT IN (SELECT id FROM gateways)) RETURNING wallet_id, held",
            [INTERRUPTED, now, *[money_text(ZERO)] * 3],
        )
        released: dict[str, Decimal] = {}
        for row in interrupted:
            if row["wallet_id"] and row["held"]:
                released[row["wallet_id"]] = released.get(row["wallet_id"], ZERO) + Decimal(row["held"])
        for wallet_id, amount in released.items():
            release = "UPDATE wallets SET held = money_sub(held, ?) WHERE id = ?"
            self.db.execute(release, [money_text(amount), wallet_id])
        return len(interrupted)

    def record_audit(self, entry: dict) -> None:
        self._insert("audit", entry)

    # --- reading -----------------------------------------------------------------------------

    def request(self, request_id: str) -> dict | None:
        return self.db.row("SELECT * FROM requests WHERE request_id = ?", [request_id])

    def recent_requests(self, limit: int = 20) -> list[dict]:
        return self.db.rows("SELECT * FROM requests ORDER BY created_at DESC, request_id DESC LIMIT ?", [limit])


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
