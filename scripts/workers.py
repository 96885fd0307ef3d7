"""Several gateway workers behind one port: `scripts/gateway --workers N`.

N `mitmdump` processes, each a gateway of its own on the shared ledger (its own instance id and
lease, meterproxy/leases.py), listen on free loopback ports; HAProxy, in TCP mode, serves the
one public port and spreads connections over them (least connections), so explicit-proxy mode
(CONNECT) and TLS pass through untouched. Why HAProxy rather than SO_REUSEPORT: mitmproxy opens
its listening socket itself without SO_REUSEPORT (asyncio.start_server), which could only be
changed by patching mitmproxy; HAProxy also stops sending to a worker that died while it is
restarted (health checks). docs/workers.md has the measurements.

A worker that dies is started again; SIGTERM or SIGINT stops HAProxy's listener first, then
every worker, each completing its calls in flight.

    python scripts/workers.py N HOST PORT -- <mitmdump arguments>
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESTART_DELAY = 1.0  # seconds between a worker's death and its restart
HEALTH_INTERVAL_MS = 1000
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int, processes: list, timeout: float = 120, host: str = "127.0.0.1") -> bool:
    """Wait until `host:port` accepts connections; False if one of `processes` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            return False
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def haproxy_config(host: str, port: int, workers: list[int]) -> str:
    servers = "\n".join(
        f"    server worker{index} 127.0.0.1:{worker} check inter {HEALTH_INTERVAL_MS}"
        for index, worker in enumerate(workers)
    )
    return f"""global
    maxconn 4000

defaults
    mode tcp
    retries 3
    option redispatch  # a connection a worker refuses (it is restarting) goes to another
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend meterproxy
    bind {host}:{port}
    default_backend workers

backend workers
    balance leastconn
{servers}
"""


class Workers:
    def __init__(self, count: int, host: str, port: int, mitmdump_args: list[str]):
        self.host, self.port, self.args = host, port, mitmdump_args
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.folder = Path(tempfile.mkdtemp(prefix="meterproxy-workers-"))
        self.haproxy: subprocess.Popen | None = None
        self.stopping = False

    def start_worker(self, index: int) -> None:
        command = [
            "mitmdump",
            *self.args,
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.ports[index]),
        ]
        self.processes[index] = subprocess.Popen(command, preexec_fn=_stop_with_parent)

    def run(self) -> int:
        # The first worker alone until it listens: it creates mitmproxy's CA in the confdir,
        # which the others would otherwise race to create too.
        for index in range(len(self.ports)):
            self.start_worker(index)
            if index == 0 and not listening(self.ports[0], self.processes[:1]):
                break
        for port in self.ports:  # the port is served once every worker listens
            if not listening(port, [process for process in self.processes if process is not None]):
                print("meterproxy: a worker did not start; stopping", file=sys.stderr, flush=True)
                self.stop()
                return 1
        config = self.folder / "haproxy.cfg"
        config.write_text(haproxy_config(self.host, self.port, self.ports))
        self.haproxy = subprocess.Popen(["haproxy", "-f", str(config), "-db"], preexec_fn=_stop_with_parent)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        reachable = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host.strip("[]")
        if not listening(self.port, [self.haproxy], host=reachable):
            print("meterproxy: HAProxy did not start; stopping", file=sys.stderr, flush=True)
            self.stop()
            return 1
        print(f"meterproxy: {len(self.ports)} workers serving at {self.host}:{self.port}", flush=True)
        while not self.stopping:
            time.sleep(0.2)
            if self.haproxy.poll() is not None and not self.stopping:
                print("meterproxy: HAProxy stopped; stopping the workers", file=sys.stderr, flush=True)
                self.stop()
                return 1
            for index, process in enumerate(self.processes):
                if process.poll() is not None and not self.stopping:
                    print(f"meterproxy: worker {index} exited ({process.returncode}); restarting it", flush=True)
                    time.sleep(RESTART_DELAY)
                    self.start_worker(index)
        return 0

    def stop(self, *_signal) -> None:
        """The listener first (no new connections), then each worker, which completes its calls
        in flight as a single gateway does on SIGTERM."""
        if self.stopping:
            return
        self.stopping = True
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGUSR1)  # soft stop: no new connections
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self.processes:
            if process is not None:
                process.wait()
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait()
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


def _stop_with_parent() -> None:
    """In the child: SIGTERM when this supervisor dies, however it dies (Linux), so that no
    worker outlives it holding the ledger's calls and a port."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main() -> int:
    count, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    if count < 1:
        sys.exit("meterproxy: --workers takes a number of workers, at least 1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return Workers(count, host, port, args).run()


if __name__ == "__main__":
    sys.exit(main())
