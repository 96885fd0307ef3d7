"""Who a gateway is, for the ledger it shares with others: an instance id, the machine and the
process, and a lease it renews. A gateway's calls in flight are its own: when it restarts it
interrupts the ones its dead predecessor on the same machine left (it can see that process is
gone), and any gateway interrupts those of a gateway whose lease has expired (another machine's,
that did not come back). No gateway touches the calls of another that lives.
"""

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meterproxy.ids import new_id
from meterproxy.store import iso

DEFAULT_LEASE = 20  # seconds; renewed every quarter of it


def machine() -> str:
    """This machine's name and boot: a pid means the same process only within one boot."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown boot"
    return f"{socket.gethostname()} {boot}"


def process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot), so that a reused pid is told apart;
    None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the 22nd field, after the command's name


def new_gateway(lease: float) -> dict:
    """This process's row in the ledger's `gateways` table."""
    now = datetime.now(UTC)
    return {
        "id": new_id("gw"),
        "host": machine(),
        "pid": os.getpid(),
        "process_start": process_start(os.getpid()),
        "started_at": iso(now),
        "lease_until": lease_end(lease, now),
    }


def lease_end(lease: float, now: datetime | None = None) -> str:
    return iso((now or datetime.now(UTC)) + timedelta(seconds=lease))


def dead_here(gateway: dict) -> bool:
    """Whether the gateway ran on this machine and its process is gone."""
    return gateway["host"] == machine() and process_start(gateway["pid"]) != gateway["process_start"]
