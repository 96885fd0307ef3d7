"""A throwaway PostgreSQL cluster for the tests: initdb in a folder, started on a free loopback
port, stopped and removed after. `initdb` refuses to run as root, so as root it runs as the
`postgres` user (PostgreSQL 15's binaries are in /usr/local/bin on this project's machines).

    python scripts/pg_cluster.py start DIR   # prints the cluster's URL
    python scripts/pg_cluster.py stop DIR    # stops it and removes DIR
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin")


def binary(name: str) -> str | None:
    for folder in BIN_DIRS:
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """One cluster in `folder`: data, socket and log."""

    def __init__(self, folder: Path, port: int | None = None, listen: tuple[str, ...] = ("127.0.0.1",)):
        """`listen`: the addresses it listens on (a test's veth links, say), trusted."""
        self.folder = folder
        self.listen = listen
        self.data = folder / "data"
        self.port_file = folder / "port"
        self.port = port or (int(self.port_file.read_text()) if self.port_file.exists() else free_port())

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, text=True)

    def create(self) -> None:
        if binary("initdb") is None:
            raise RuntimeError("no initdb: PostgreSQL 15 is not installed")
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        self.port_file.write_text(str(self.port))
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.writelines(f"host all all {address}/24 trust\n" for address in self.listen if address != "127.0.0.1")
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses={','.join(self.listen)} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(binary("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        cluster = Cluster(folder)
        cluster.create()
        print(cluster.url)
    elif action == "stop":
        Cluster(folder).remove()
    else:
        sys.exit(f"usage: {sys.argv[0]} start|stop DIR")
