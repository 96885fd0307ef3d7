"""The ledger backends the tests run on: a SQLite file, and a fresh database in the throwaway
PostgreSQL cluster that scripts/test starts (its URL in METERPROXY_TEST_PG); without it, the
PostgreSQL cases skip and say why."""

import os
import uuid
from pathlib import Path

import pytest

BACKENDS = ("sqlite", "postgresql")
PG_URL = os.environ.get("METERPROXY_TEST_PG")


def ledger_target(backend: str, tmp: Path) -> str:
    """A new, empty ledger on `backend`: a SQLite file in `tmp`, or a new PostgreSQL database."""
    if backend == "sqlite":
        return str(tmp / "ledger.sqlite")
    if not PG_URL:
        pytest.skip("no PostgreSQL: run the tests with scripts/test, which starts a throwaway cluster")
    import psycopg

    name = f"ledger_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return PG_URL.rsplit("/", 1)[0] + "/" + name
