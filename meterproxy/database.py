"""The two ledger backends behind one small interface: SQLite (one file, the embedded default)
and PostgreSQL (`postgresql://…`, for several gateways on several machines).

Everything above this module writes one SQL dialect: `?` placeholders, the `money_*` functions
(exact decimal arithmetic: SQLite gets them as Python functions over its 10-decimal strings,
PostgreSQL as inlined SQL functions over NUMERIC, see meterproxy/schema.py) and plain SELECT,
INSERT, UPDATE, DELETE. A backend gives rows as dicts in one shape: money and other decimals as
their exact text, times as ISO 8601 UTC text, whatever the column types underneath.

psycopg 3 is the PostgreSQL driver: it is already what the project locks, it speaks both
blocking and asyncio, binary and pipelined, with a maintained pool (psycopg_pool); asyncpg would
bring a second dialect of placeholders and its own types for no gain here, since the ledger's
writes run on a thread of their own (meterproxy/writer.py), never on mitmproxy's event loop.
"""

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import sqlite_utils

from pricing.money import money_text


class LedgerUnavailable(Exception):
    """The ledger database does not take work now (locked, full, unreachable): calls that need
    it are refused with 503 until it does."""


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def open_database(target: str | Path, busy_timeout: float = 30) -> "SQLiteDatabase | PostgresDatabase":
    """The backend `target` names: a PostgreSQL URL, or a SQLite file. A PostgreSQL password
    comes from the environment (PGPASSWORD) or ~/.pgpass, never from the URL: an option's value
    is shown by mitmweb and `ps`."""
    if is_postgres(target):
        return PostgresDatabase(str(target))
    return SQLiteDatabase(target, busy_timeout)


class Rows:
    """What both backends offer above their driver's cursor."""

    kind: str
    unavailable: tuple[type[Exception], ...]  # the database cannot take the work now: try again later
    error: type[Exception]  # a statement failed

    def rows(self, sql: str, params=()) -> list[dict]:
        cursor = self.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, map(plain, values))) for values in cursor.fetchall()]

    def row(self, sql: str, params=()) -> dict | None:
        found = self.rows(sql, params)
        return found[0] if found else None

    def scalar(self, sql: str, params=()):
        found = self.execute(sql, params).fetchone()
        return None if found is None else plain(found[0])


def plain(value):
    """A value as the ledger's API gives it: exact decimal text, ISO 8601 UTC times."""
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, datetime):
        from meterproxy.store import iso

        return iso(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


class SQLiteDatabase(sqlite_utils.Database, Rows):
    """sqlite_utils' Database (its table helpers stay at hand for tests and tools), with the
    ledger's money functions."""

    kind = "sqlite"
    unavailable = (sqlite3.OperationalError,)
    error = sqlite3.Error  # a statement failed

    def __init__(self, path: str | Path, busy_timeout: float = 30):
        self.path = path
        connection = sqlite3.connect(str(path), timeout=busy_timeout, check_same_thread=False)
        super().__init__(connection)
        connection.create_function("money_add", 2, _money_add, deterministic=True)
        connection.create_function("money_sub", 2, _money_sub, deterministic=True)
        connection.create_function("money_covers", 3, _money_covers, deterministic=True)

    def lock(self, table: str, row_id: str) -> None:
        """Nothing: a writing transaction holds the whole database."""

    def reconnect(self) -> None:
        """Nothing: a file does not go away."""

    def json_text(self, column: str, key: str) -> tuple[str, list]:
        return f"json_extract({column}, ?)", [f'$."{key}"']

    def create(self, table: str, columns: dict[str, str], pk: str, foreign_keys=()) -> None:
        from meterproxy.schema import PYTHON_TYPES

        types = {name: PYTHON_TYPES[kind] for name, kind in columns.items()}
        self[table].create(types, pk=pk, foreign_keys=foreign_keys)

    def add_column(self, table: str, name: str, kind: str) -> None:
        from meterproxy.schema import PYTHON_TYPES

        self[table].add_column(name, PYTHON_TYPES[kind])

    def has_table(self, table: str) -> bool:
        return self[table].exists()

    def columns_of(self, table: str) -> set[str]:
        return set(self[table].columns_dict)

    def begin(self, immediate: bool = True) -> None:
        self.conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction


def _money_add(a, b) -> str:
    return money_text(Decimal(a or 0) + Decimal(b or 0))


def _money_sub(a, b) -> str:
    return money_text(Decimal(a or 0) - Decimal(b or 0))


def _money_covers(balance, held, amount) -> int:
    return int(Decimal(balance or 0) - Decimal(held or 0) >= Decimal(amount or 0))


# The type of each kind of column on PostgreSQL (meterproxy/schema.py names the kinds).
PG_TYPES = {
    "text": "TEXT",
    "integer": "BIGINT",
    "money": "NUMERIC(30, 10)",
    "decimal": "NUMERIC",
    "time": "TIMESTAMPTZ",
    "bytes": "BYTEA",
}


CONNECT_TIMEOUT = 3  # seconds


class PostgresDatabase(Rows):
    """One PostgreSQL connection in autocommit mode, with transactions begun explicitly, as the
    SQLite backend's are."""

    kind = "postgresql"

    def __init__(self, url: str):
        import psycopg

        self.path = url
        self.url = url
        self.unavailable = (psycopg.OperationalError, LedgerUnavailable)
        self.error = psycopg.Error
        self.conn = self._connect()

    def _connect(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)

    def reconnect(self) -> None:
        """A connection the server dropped (a restart, a network cut) is made again; while the
        server cannot be reached this raises one of `unavailable`."""
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = self._connect()

    def close(self) -> None:
        self.conn.close()

    def execute(self, sql: str, params=()):
        """`?` placeholders, as SQLite's; flags as the integers SQLite keeps them as."""
        values = [int(value) if isinstance(value, bool) else value for value in params]
        return self.conn.execute(sql.replace("%", "%%").replace("?", "%s"), values)

    def lock(self, table: str, row_id: str) -> None:
        """Hold the row until the transaction ends: the admissions that count a connection's
        rate take their turns, on every gateway."""
        self.execute(f"SELECT 1 FROM {table} WHERE id = ? FOR UPDATE", [row_id])

    def json_text(self, column: str, key: str) -> tuple[str, list]:
        return f"({column}::jsonb ->> ?)", [key]

    def create(self, table: str, columns: dict[str, str], pk: str, foreign_keys=()) -> None:
        definitions = []
        for name, kind in columns.items():
            if name == pk and kind == "integer":
                definitions.append(f"{name} BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
            else:
                definitions.append(f"{name} {PG_TYPES[kind]}" + (" PRIMARY KEY" if name == pk else ""))
        definitions += [f"FOREIGN KEY ({column}) REFERENCES {other} (id)" for column, other in foreign_keys]
        self.execute(f"CREATE TABLE {table} ({', '.join(definitions)})")

    def add_column(self, table: str, name: str, kind: str) -> None:
        self.execute(f"ALTER TABLE {table} ADD COLUMN {name} {PG_TYPES[kind]}")

    def has_table(self, table: str) -> bool:
        return self.scalar("SELECT to_regclass(?) IS NOT NULL", [table])

    def columns_of(self, table: str) -> set[str]:
        query = "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
        return {row["column_name"] for row in self.rows(query, [table])}

    def begin(self, immediate: bool = True) -> None:
        self.execute("BEGIN")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if not self.conn.broken and self.in_transaction:
            self.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.conn.info.transaction_status != TransactionStatus.IDLE

    def __getitem__(self, table: str) -> "Table":
        return Table(self, table)


class Table:
    """The few table helpers of sqlite_utils that the project reads with, on PostgreSQL."""

    def __init__(self, db: PostgresDatabase, name: str):
        self.db, self.name = db, name

    @property
    def rows(self) -> Iterator[dict]:
        return iter(self.db.rows(f"SELECT * FROM {self.name}"))

    @property
    def count(self) -> int:
        return self.db.scalar(f"SELECT COUNT(*) FROM {self.name}")

    def get(self, row_id: str) -> dict:
        found = self.db.row(f"SELECT * FROM {self.name} WHERE id = ?", [row_id])
        if found is None:
            raise sqlite_utils.db.NotFoundError(row_id)
        return found

    def rows_where(self, where: str | None = None, params=(), order_by: str | None = None, limit=None):
        sql = f"SELECT * FROM {self.name}" + (f" WHERE {where}" if where else "")
        sql += (f" ORDER BY {order_by}" if order_by else "") + (f" LIMIT {int(limit)}" if limit is not None else "")
        return iter(self.db.rows(sql, params))

    def exists(self) -> bool:
        return self.db.has_table(self.name)


@contextmanager
def transaction(db: SQLiteDatabase | PostgresDatabase, immediate: bool = True):
    """A transaction on either backend, rolled back by an exception."""
    db.begin(immediate)
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


Database = SQLiteDatabase | PostgresDatabase  # what every reader of the ledger takes
