#!/usr/bin/env python3
"""Benchmark meterproxy against bare mitmdump on loopback, with the local fake provider.

One command: `python3 scripts/bench.py` (it re-runs itself in the project's `.venv`, made by
`scripts/bootstrap.sh` if needed). It starts the fake provider and the targets, and measures one
target at a time, each alone on one CPU where `taskset` allows it (the fake provider, `wrk` and
this script's own clients share the other CPU). The wrk figures are measured in rounds (default
3) that take the targets in turn, so that a slow spell of the machine falls on every target, and
each is reported as its median round:

  a  direct      the fake provider itself
  b  mitmdump    bare `mitmdump` in regular mode, no addon: the clients use it as their HTTP proxy
                 (absolute-form requests for the fake provider's URLs)
  w  +forward    `mitmdump -s scripts/bench_forward.py`: a forward-URL addon and nothing else, for
                 reference (the request line names the gateway's path, as meterproxy's clients do)
  c  +stream     b with `--set stream_large_bodies=1` (every body streamed)
  n  -ledger     `mitmdump -s scripts/bench_no_ledger.py`: meterproxy without its ledger, for
                 reference (routing, keys, limits and usage, but no hold, no row, no price)
  d  meterproxy  `mitmdump -s addons/gateway.py`: full metering, pricing, wallet holds, ledger
  l  +live page  d with a dashboard client following its live page (`scripts/bench_live.py`):
                 its requests/s should be within 5 % of d's
  e  litellm     LiteLLM's proxy (`--peers`, installed into bench-results/peers/litellm)
  f  portkey     Portkey's gateway (`--peers`, installed into bench-results/peers/portkey)

Figures: non-streamed requests/s at a fixed concurrency (wrk, default 16 connections), its
p50/p99, p50 at concurrency 1; streams/s (20 chunks each); the target's CPU time per request and
per stream (user + system of all its threads, from /proc/<pid>/stat, over each wrk run, divided
by the answers wrk counted); time to first byte of a paced stream (5 ms between chunks); the
target's resident memory growth while one ~100 MB stream passes through; and a micro-benchmark
of the ledger writer (`meterproxy.writer.LedgerWriter`, open + complete per row, from concurrent
calls on one event loop). It prints a table with each figure's ratio to b (non-streamed) or c
(streamed) and the acceptance targets, writes bench-results/bench.json and draws
bench-results/bench.png.

Each round takes every wrk run (non-streamed at 16 and at 1 connection, streams) in turn across
the targets, then a share of the paced streams of each: the two runs that a CPU ratio compares
are seconds apart. A CPU ratio is the median of the rounds' ratios (meterproxy's to each peer
too); CPU time is what the process was given, so other work on the machine moves it far less
than requests per second, but not at all only on an idle machine (a busy sibling hyperthread or
cold caches make every instruction dearer): note the load average the table ends with.
`--cpu-only` runs just what the CPU figures need. `--profile` adds a run of b and d
(non-streamed) and of c and d (streams) under py-spy, and splits the event loop's CPU time per
answer by phase of the call (scripts/bench_profile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt-4o-mini"
REPLY_BYTES = 693  # the reference setup's reply size; max_tokens is chosen to come closest
STREAM_CHUNKS = 20
PACE = 0.005  # seconds between chunks of the paced stream
BIG_WORD_BYTES = 1000
UPSTREAM_KEY = "sk-bench-upstream-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
OWN_TARGETS = "abwcndl"  # in the order they are measured and shown; then the peers
ALL_TARGETS = OWN_TARGETS + "ef"


def ensure_venv() -> None:
    """Re-run in the project's virtualenv (created by scripts/bootstrap.sh when missing)."""
    venv = Path(os.environ.get("METERPROXY_VENV", ROOT / ".venv"))
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    subprocess.run(["bash", "-c", 'source "$0"', str(ROOT / "scripts" / "bootstrap.sh")], check=True)
    python = venv / "bin" / "python"
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


# --- processes ---------------------------------------------------------------------------

PROCS: list[Proc] = []


@dataclass
class Pinning:
    target: int | None = None  # CPU of the target under test
    load: int | None = None  # CPU of the fake provider, wrk and this script
    note: str = ""

    @property
    def enabled(self) -> bool:
        return self.target is not None


PIN = Pinning()


def setup_pinning() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        PIN.note = f"UNPINNED: only {len(cpus)} CPU available to this process"
    elif shutil.which("taskset") is None:
        PIN.note = "UNPINNED: taskset not found (util-linux)"
    else:
        PIN.target, PIN.load = cpus[0], cpus[1]
        os.sched_setaffinity(0, {PIN.load})  # children (fake provider, wrk) inherit this
        PIN.note = f"target alone on CPU {PIN.target}; fake provider, wrk and bench clients on CPU {PIN.load}"


class Proc:
    """A child process in its own process group, its output kept (last lines) and drained."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        pattern: str | None = None,
        env: dict | None = None,
        on_target_cpu: bool = False,
        timeout: float = 60,
        cwd: Path = ROOT,
    ):
        if on_target_cpu and PIN.enabled:
            cmd = ["taskset", "-c", str(PIN.target), *cmd]
        self.name = name
        self.lines: deque[str] = deque(maxlen=300)
        self.match: re.Match | None = None
        self._pattern = re.compile(pattern) if pattern else None
        self._ready = threading.Event()
        self.popen = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        PROCS.append(self)
        threading.Thread(target=self._drain, daemon=True).start()
        if self._pattern is not None:
            self._ready.wait(timeout)
            if self.match is None:
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{self.output()}")

    def _drain(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)
            if self._pattern is not None and self.match is None and (match := self._pattern.search(line)):
                self.match = match
                self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self, last: int = 40) -> str:
        return "".join(list(self.lines)[-last:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all its threads) so far."""
        return sum(self.cpu_times())

    def main_thread_seconds(self) -> float:
        """User + system CPU time of the process's first thread (a Python program's main
        thread: mitmproxy's event loop) so far."""
        try:
            fields = Path(f"/proc/{self.pid}/task/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU time of the process (all its threads) so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0, 0.0

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM in kB."""
        found = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line[:5]] = int(line.split()[1])
        except OSError:
            pass
        return found

    def stop(self) -> None:
        if self in PROCS:
            PROCS.remove(self)
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)  # its own group, started by us
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()


def stop_all() -> None:
    for proc in reversed(list(PROCS)):
        try:
            proc.stop()
        except Exception as error:  # keep stopping the others
            print(f"could not stop {proc.name}: {error}", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30
) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def wait_http(port: int, path: str, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
        try:
            if http_request(port, "GET", path, timeout=2)[0] < 500:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name} did not answer {path} within {timeout:.0f} s:\n{proc.output()}")


class Fake:
    """scripts/fake_provider.py, on the load CPU (the upstream of every gateway) or alone on the
    target CPU (target a)."""

    def __init__(self, on_target_cpu: bool = False):
        self.proc = Proc(
            "fake provider",
            [sys.executable, str(ROOT / "scripts" / "fake_provider.py"), "--port", "0"],
            pattern=r"listening at 127\.0\.0\.1:(\d+)",
            on_target_cpu=on_target_cpu,
        )
        self.port = int(self.proc.match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def behave(self, *behaviours: dict) -> None:
        status, _, body = http_request(self.port, "POST", "/_fake/behaviours", json.dumps(list(behaviours)).encode())
        if status != 200:
            raise RuntimeError(f"fake provider refused behaviours: {status} {body[:200]!r}")

    def clear(self) -> None:
        """Forget the request log (it keeps every request) and pending behaviours."""
        http_request(self.port, "DELETE", "/_fake/requests")

    def stop(self) -> None:
        self.proc.stop()


# --- targets -----------------------------------------------------------------------------


@dataclass
class Target:
    key: str
    label: str
    proc: Proc | None = None
    port: int = 0
    path: str = "/openai/v1/chat/completions"
    headers: dict = field(default_factory=dict)
    upstream: Fake | None = None  # where behaviours go
    buffers_streams: bool = False  # bodies pass buffered, not streamed (b)
    cleanup: list = field(default_factory=list)  # callables run at stop, in order
    notes: list[str] = field(default_factory=list)
    ledger: dict | None = None  # meterproxy's ledger after the run

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        for action in self.cleanup:
            action()


def mitmdump_cmd(confdir: str, *args: str) -> list[str]:
    mitmdump = str(Path(sys.executable).with_name("mitmdump"))
    return [
        mitmdump,
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        "0",
        "--set",
        f"confdir={confdir}",
        "--set",
        "flow_detail=0",
        *args,
    ]


PROXY_LISTENING = r"(?i)proxy listening at 127\.0\.0\.1:(\d+)"


def start_direct(fake: Fake) -> Target:
    own = Fake(on_target_cpu=True)
    target = Target(
        "a", "direct", own.proc, own.port, upstream=own, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}
    )
    return target


def start_mitmdump(fake: Fake, streaming: bool = False, forward_addon: bool = False) -> Target:
    """Bare mitmdump as its clients' HTTP proxy (b, c: absolute-form requests, nothing loaded),
    or with the forward-URL addon (w: the request names a path of the gateway's own)."""
    work = tempfile.TemporaryDirectory(prefix="bench-mitmdump-")
    args = []
    if forward_addon:
        args += ["-s", str(ROOT / "scripts" / "bench_forward.py"), "--set", f"bench_upstream={fake.url}"]
    if streaming:
        args += ["--set", "stream_large_bodies=1"]
    key, label = ("w", "+forward") if forward_addon else ("c", "+stream") if streaming else ("b", "mitmdump")
    proc = Proc(f"mitmdump ({key})", mitmdump_cmd(work.name, *args), pattern=PROXY_LISTENING, on_target_cpu=True)
    return Target(
        key,
        label,
        proc,
        int(proc.match.group(1)),
        path=Target.path if forward_addon else fake.url + Target.path,
        upstream=fake,
        buffers_streams=not streaming,
        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
        cleanup=[work.cleanup],
    )


def bench_account(db: str | Path) -> str:
    """A merchant, product, funded wallet and connection in the ledger `db`: the forward token
    the benchmark's clients send."""
    from meterproxy.store import Store
    from meterproxy.token import encode_token
    from pricing.fees import ProductFees

    store = Store(db)
    merchant, secret_key = store.create_merchant("bench merchant")
    _, product_secret = store.create_product(merchant["id"], "bench product", ProductFees(fixed_fee=Decimal("0.0001")))
    wallet = store.create_wallet("bench wallet", Decimal("1000000"))
    _, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    store.close()
    return encode_token(secret_key=secret_key, connection_secret=connection_secret, product_secret=product_secret)


def start_meterproxy(fake: Fake, ledger: bool = True, live_page: bool = False) -> Target:
    """meterproxy (d), or without its ledger (n), or with a dashboard client on its live page
    (l), with an account whose token the clients send."""
    work = tempfile.TemporaryDirectory(prefix="bench-meterproxy-")
    db = Path(work.name) / "ledger.sqlite"
    token = bench_account(db)
    providers = Path(work.name) / "providers.toml"
    providers.write_text(f'[providers.openai]\nupstream = "{fake.url}/openai"\n')
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["OPENAI_API_KEY"] = UPSTREAM_KEY
    script, key, label = (
        ("addons/gateway.py", "d", "meterproxy") if ledger else ("scripts/bench_no_ledger.py", "n", "-ledger")
    )
    if live_page:
        key, label = "l", "+ live page"
    options = ["--set", f"meterproxy_db={db}"] if ledger else []
    proc = Proc(
        label,
        mitmdump_cmd(work.name, "-s", str(ROOT / script), *options, "--set", f"meterproxy_providers={providers}"),
        pattern=PROXY_LISTENING,
        env=env,
        on_target_cpu=True,
    )
    target = Target(
        key, label, proc, int(proc.match.group(1)), upstream=fake, headers={"Authorization": f"Bearer {token}"}
    )

    def summarize() -> None:  # once the gateway has stopped (its writer flushed), before cleanup
        target.ledger = ledger_summary(db)

    target.cleanup = [summarize, work.cleanup] if ledger else [work.cleanup]
    if live_page:
        from meterproxy.token import decode_token
        from scripts.bench_live import LivePage

        page = LivePage(target.port, decode_token(token).secret_key)
        target.cleanup.insert(0, lambda: target.notes.append(page.stop()))
    return target


def ledger_summary(db: Path) -> dict:
    from meterproxy.store import Store

    store = Store(db)
    try:
        counts = dict(store.db.execute("SELECT status, count(*) FROM requests GROUP BY status").fetchall())
        holds = counts.get("pending", 0)
        errors = dict(
            store.db.execute(
                "SELECT substr(error_message, 1, 60), count(*) FROM requests WHERE status = 'error' GROUP BY 1"
            ).fetchall()
        )
        return {"rows": counts, "open_holds": holds, "errors": errors}
    finally:
        store.close()


PEERS_DIR = "peers"


def install_litellm(out: Path) -> Path:
    venv = out / PEERS_DIR / "litellm"
    litellm = venv / "bin" / "litellm"
    if not (venv / ".installed").exists():
        print("  installing litellm[proxy] into", venv, "(once; may take minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "litellm[proxy]"],
            check=True,
            timeout=1800,
        )
        (venv / ".installed").write_text("ok\n")
    return litellm


def start_litellm(fake: Fake, out: Path) -> Target:
    litellm = install_litellm(out)
    work = tempfile.TemporaryDirectory(prefix="bench-litellm-")
    config = Path(work.name) / "config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {fake.url}/openai/v1\n"
        f"      api_key: {UPSTREAM_KEY}\n"
    )
    port = free_port()
    master_key = "sk-" + secrets.token_hex(32)  # LiteLLM refuses to start without one
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
    }
    proc = Proc(
        "litellm",
        [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        env=env,
        on_target_cpu=True,
        cwd=Path(work.name),
    )
    try:
        wait_http(port, "/health/liveliness", proc, timeout=180)
    except Exception:
        proc.stop()
        work.cleanup()
        raise
    version = subprocess.run(
        [str(litellm.with_name("python")), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Target(
        "e",
        "litellm",
        proc,
        port,
        path="/v1/chat/completions",
        upstream=fake,
        headers={"Authorization": f"Bearer {master_key}"},
        cleanup=[work.cleanup],
        notes=[f"litellm {version}, 1 uvicorn worker, no database"],
    )


BIND_LOOPBACK = """// Loaded with `node --require`: make every listening socket bind to 127.0.0.1 only.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' || typeof args[0] === 'string') {
    if (typeof args[1] === 'string' || args[1] === undefined || args[1] === null) args[1] = '127.0.0.1';
    else args.splice(1, 0, '127.0.0.1');
  } else if (args[0] && typeof args[0] === 'object') {
    args[0] = { ...args[0], host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
"""


MUTABLE_HEADERS = """// Loaded with `node --require`: the provider's answers get headers that can be added to.
// Portkey's gateway adds its own headers to the provider's answer; with @hono/node-server 1.19
// on Node 20 its streamed answers keep the immutable headers of fetch's response, and every
// stream fails with a 500 ("TypeError: immutable"). Each answer is copied into a Response of
// its own (the same status, headers and body stream), as Portkey's other answers already are.
const realFetch = globalThis.fetch;
const RealResponse = globalThis.Response;  // undici's, before hono replaces the global
const NO_BODY = new Set([101, 103, 204, 205, 304]);
globalThis.fetch = async (...args) => {
  const response = await realFetch(...args);
  return new RealResponse(NO_BODY.has(response.status) ? null : response.body, {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
};
"""


def install_portkey(out: Path) -> Path:
    home = out / PEERS_DIR / "portkey"
    script = home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not script.exists():
        if shutil.which("npm") is None or shutil.which("node") is None:
            raise RuntimeError("node and npm are needed for Portkey's gateway")
        print("  installing @portkey-ai/gateway into", home, "...", flush=True)
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(home),
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "@portkey-ai/gateway",
            ],
            check=True,
            timeout=900,
        )
    (home / "bind-loopback.cjs").write_text(BIND_LOOPBACK)
    (home / "mutable-headers.cjs").write_text(MUTABLE_HEADERS)
    return script


def start_portkey(fake: Fake, out: Path) -> Target:
    script = install_portkey(out)
    port = free_port()
    env = {**os.environ, "NODE_ENV": "production"}
    proc = Proc(
        "portkey",
        [
            "node",
            "--require",
            str(script.parents[4] / "bind-loopback.cjs"),
            "--require",
            str(script.parents[4] / "mutable-headers.cjs"),
            str(script),
            f"--port={port}",
            "--headless",
        ],
        env=env,
        on_target_cpu=True,
    )
    try:
        wait_http(port, "/", proc, timeout=60)
    except Exception:
        proc.stop()
        raise
    package = json.loads((script.parents[1] / "package.json").read_text())
    node_version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return Target(
        "f",
        "portkey",
        proc,
        port,
        path="/v1/chat/completions",
        upstream=fake,
        headers={
            "Authorization": f"Bearer {UPSTREAM_KEY}",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"{fake.url}/openai/v1",
        },
        notes=[
            f"@portkey-ai/gateway {package.get('version')}, node {node_version}; the provider's answers copied "
            "into Responses of their own (scripts/bench.py MUTABLE_HEADERS: its streams fail on Node 20 otherwise)"
        ],
    )


# --- workloads ---------------------------------------------------------------------------


def chat_body(max_tokens: int, stream: bool = False) -> bytes:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark"}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def pick_max_tokens(fake: Fake) -> tuple[int, int]:
    """The max_tokens whose non-streamed reply body comes closest to REPLY_BYTES."""
    best = (10**9, 5, 0)
    for n in range(1, 80):
        status, _, body = http_request(
            fake.port,
            "POST",
            "/openai/v1/chat/completions",
            chat_body(n),
            {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"},
        )
        if status == 200:
            best = min(best, (abs(len(body) - REPLY_BYTES), n, len(body)))
    fake.clear()
    return best[1], best[2]


def request_headers(target: Target) -> dict:
    """With the Host header an HTTP client sends: the URL's for a request through a proxy."""
    url = urlsplit(target.path)
    return {"Host": url.netloc or f"127.0.0.1:{target.port}", "Content-Type": "application/json", **target.headers}


def smoke(target: Target, max_tokens: int) -> dict:
    """One plain request, checked, before anything is measured."""
    status, headers, body = http_request(
        target.port, "POST", target.path, chat_body(max_tokens), request_headers(target)
    )
    if status != 200 or b'"choices"' not in body:
        raise RuntimeError(f"{target.label}: non-streamed request answered {status}: {body[:300]!r}")
    return {"reply_bytes": len(body), "request_id": headers.get("x-lava-request-id")}


def smoke_stream(target: Target) -> str | None:
    """One streamed request: None if it came through whole, else what went wrong."""
    status, _, streamed = http_request(
        target.port, "POST", target.path, chat_body(STREAM_CHUNKS, stream=True), request_headers(target)
    )
    if status != 200 or b"[DONE]" not in streamed:
        return f"{target.label}: streamed request answered {status}: {streamed[:200]!r}"
    return None


def lua_string(value: str) -> str:
    return json.dumps(value)  # ASCII JSON strings are valid Lua string literals


WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


class LoadSide:
    """CPU used on the load side (fake provider upstream and wrk) and by the target during a run."""

    def __init__(self, target: Target, fake: Fake):
        self.target, self.fake = target, fake
        self.upstream = None if target.upstream is None or target.upstream.proc is target.proc else target.upstream

    def __enter__(self):
        self.start = time.monotonic()
        self.target_times = self.target.proc.cpu_times()
        self.target_cpu = sum(self.target_times)
        self.target_main = self.target.proc.main_thread_seconds()
        self.fake_cpu = self.upstream.proc.cpu_seconds() if self.upstream else 0.0
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.start
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk = (children.ru_utime + children.ru_stime) - (self.children.ru_utime + self.children.ru_stime)
        fake = (self.upstream.proc.cpu_seconds() - self.fake_cpu) if self.upstream else 0.0
        user, system = (now - then for now, then in zip(self.target.proc.cpu_times(), self.target_times))
        self.target_seconds = user + system
        self.other_threads = self.target_seconds - (self.target.proc.main_thread_seconds() - self.target_main)
        self.system_share = system / self.target_seconds if self.target_seconds else None
        self.result = {
            "target_cpu": round(self.target_seconds / wall, 3),
            "fake_cpu": round(fake / wall, 3),
            "wrk_cpu": round(wrk / wall, 3),
            "load_cpu": round((fake + wrk) / wall, 3),
        }


class Clearer:
    """Clears the fake provider's request log every few seconds during a long run."""

    def __init__(self, fake: Fake | None, every: float = 1):
        self.fake, self.every, self._stop = fake, every, threading.Event()

    def __enter__(self):
        if self.fake is not None:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.fake.clear()
            except OSError:
                pass

    def __exit__(self, *exc):
        self._stop.set()


def wrk(target: Target, fake: Fake, body: bytes, connections: int, duration: int, work: Path) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu)")
    headers = "".join(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}\n" for k, v in request_headers(target).items())
    script = work / f"wrk-{target.key}.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.path = {lua_string(target.path)}\n'
        f"wrk.body = {lua_string(body.decode())}\n{headers}{WRK_DONE}"
    )
    if target.upstream is not None:
        target.upstream.clear()
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        f"http://127.0.0.1:{target.port}",
    ]
    with LoadSide(target, fake) as load, Clearer(target.upstream):
        run = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    line = next((x for x in run.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({run.returncode}): {run.stdout[-800:]} {run.stderr[-800:]}")
    raw = json.loads(line.split(" ", 1)[1])
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    if errors:
        print(f"  WARNING {target.label}: wrk counted errors {errors} (status = non-2xx answers)", flush=True)
    seconds = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "requests": raw["requests"],
        "per_s": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "errors": errors,
        # The target's own CPU time (user + system, all its threads) per answer: what the
        # gateway costs, whatever else the machine runs, as long as the target is not starved.
        "cpu_us": load.target_seconds * 1e6 / raw["requests"] if raw["requests"] else None,
        "system_share": load.system_share,  # of that CPU time, the kernel's (system calls)
        # of that CPU time, the threads' other than the main one (meterproxy's store thread)
        "other_threads_us": load.other_threads * 1e6 / raw["requests"] if raw["requests"] else None,
        **load.result,
    }


def paced_ttfb(target: Target, count: int) -> dict:
    """Sequential streams of STREAM_CHUNKS chunks, PACE seconds apart, on one keep-alive
    connection: time from sending the request to the first byte of the body."""
    body, headers = chat_body(STREAM_CHUNKS, stream=True), request_headers(target)
    connection = http.client.HTTPConnection("127.0.0.1", target.port, timeout=30)
    firsts, totals = [], []
    try:
        for i in range(count + 3):  # the first three warm the connection up
            target.upstream.clear()
            target.upstream.behave({"chunk_delay": PACE})
            started = time.perf_counter()
            connection.request("POST", target.path, body=body, headers=headers)
            response = connection.getresponse()
            first = response.read1(65536)
            first_at = time.perf_counter()
            rest = response.read()
            ended = time.perf_counter()
            if response.status != 200 or b"[DONE]" not in first + rest:
                raise RuntimeError(f"paced stream answered {response.status}: {(first + rest)[:300]!r}")
            if i >= 3:
                firsts.append((first_at - started) * 1000)
                totals.append((ended - started) * 1000)
    finally:
        connection.close()
    return {"firsts": firsts, "totals": totals}


def ttfb_summary(samples: list[dict]) -> dict:
    """The paced streams of every round together; and each round's median."""
    firsts = sorted(first for sample in samples for first in sample["firsts"])
    totals = [total for sample in samples for total in sample["totals"]]
    return {
        "streams": len(firsts),
        "ttfb_p50_ms": statistics.median(firsts),
        "ttfb_p90_ms": firsts[min(len(firsts) - 1, int(len(firsts) * 0.9))],
        "ttfb_min_ms": firsts[0],
        "stream_p50_ms": statistics.median(totals),
        "rounds_p50_ms": [round(statistics.median(sample["firsts"]), 3) for sample in samples],
    }


def big_stream(target: Target, megabytes: int, timeout: float) -> dict:
    """One stream of `megabytes` MB of content (1000-byte words), read and discarded, while
    the target's resident memory is sampled. After `timeout` seconds the stream is cut and the
    figures are those of the part that passed (`complete` false)."""
    words = megabytes * 1_000_000 // BIG_WORD_BYTES
    body = chat_body(words, stream=True)
    target.upstream.clear()
    target.upstream.behave({"words": words, "word_bytes": BIG_WORD_BYTES})
    proc = target.proc
    before = proc.memory_kb()
    peak = [before.get("VmRSS", 0)]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_kb().get("VmRSS", 0))

    sampler = threading.Thread(target=sample, daemon=True)
    head = "".join(f"{k}: {v}\r\n" for k, v in request_headers(target).items())
    request = (
        f"POST {target.path} HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    received, tail, first, complete = 0, b"", b"", True
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    sampler.start()
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", target.port), timeout=60) as sock:
            sock.sendall(request)
            while True:
                if time.perf_counter() - started > timeout:
                    complete = False
                    break
                n = sock.recv_into(buffer)
                if not n:
                    break
                if not first:
                    first = bytes(view[: min(n, 64)])
                received += n
                tail = (tail + bytes(view[max(0, n - 64) : n]))[-64:]
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
    after = proc.memory_kb()
    peak[0] = max(peak[0], after.get("VmRSS", 0))
    if not first.startswith(b"HTTP/1.1 200") or (complete and b"[DONE]" not in tail):
        raise RuntimeError(f"the {megabytes} MB stream ended badly: starts {first!r}, ends {tail!r}")
    if not complete:
        print(
            f"  {target.key} {target.label}: the {megabytes} MB stream was cut after {timeout:.0f} s "
            f"({received / 1e6:.0f} MB on the wire had passed)",
            flush=True,
        )
    return {
        "complete": complete,
        "content_mb": megabytes,
        "wire_mb": round(received / 1e6, 1),
        "seconds": round(elapsed, 2),
        "mb_per_s": received / 1e6 / elapsed,
        "rss_before_mb": before.get("VmRSS", 0) / 1024,
        "rss_peak_mb": peak[0] / 1024,
        "rss_after_mb": after.get("VmRSS", 0) / 1024,
        "rss_growth_mb": (peak[0] - before.get("VmRSS", 0)) / 1024,
        "hwm_before_mb": before.get("VmHWM", 0) / 1024,
        "hwm_after_mb": after.get("VmHWM", 0) / 1024,
    }


# The figures measured with wrk in every round, and which of a round's runs stands for them:
# the median by the figure the targets are checked on.
ROUND_RUNS = {"throughput": "per_s", "concurrency_1": "p50_ms", "streams": "per_s"}


def step(target: Target, what: str) -> None:
    print(f"  {target.key} {target.label}: {what}", flush=True)


def prepare(target: Target, fake: Fake, settings: argparse.Namespace, max_tokens: int, work: Path) -> dict:
    """Check that the target answers, streamed too, and warm it up."""
    result: dict = {"label": target.label, "notes": target.notes, "rounds": {run: [] for run in ROUND_RUNS}}
    result["smoke"] = smoke(target, max_tokens)
    stream_error = smoke_stream(target)
    if stream_error is not None:
        if target.key in OWN_TARGETS:
            raise RuntimeError(stream_error)
        step(target, f"streamed figures UNAVAILABLE: {stream_error}")
        result["stream_error"] = stream_error
        target.notes.append(f"streaming unavailable: {stream_error}")
    step(target, "warm-up")
    wrk(target, fake, chat_body(max_tokens), settings.connections, 1, work)
    return result


def round_runs(settings: argparse.Namespace, max_tokens: int) -> dict[str, tuple[bytes, int, str]]:
    """The wrk runs of a round: body, connections, description."""
    plain, streamed = chat_body(max_tokens), chat_body(STREAM_CHUNKS, stream=True)
    runs = {
        "throughput": (plain, settings.connections, f"non-streamed, {settings.connections} connections"),
        "concurrency_1": (plain, 1, "non-streamed, 1 connection"),
        "streams": (streamed, settings.connections, f"streams of {STREAM_CHUNKS} chunks, {settings.connections} conns"),
    }
    if settings.cpu_only:
        del runs["concurrency_1"]
    return runs


def measure_run(
    target: Target, result: dict, fake: Fake, settings: argparse.Namespace, run: str, spec: tuple, work: Path
) -> None:
    """One wrk run, added to the target's rounds."""
    body, connections, what = spec
    if run == "streams" and "stream_error" in result:
        return
    step(target, f"{what}, {settings.duration} s")
    result["rounds"][run].append(wrk(target, fake, body, connections, settings.duration, work))


def settle_rounds(result: dict) -> None:
    """Each wrk figure as its median round (the whole run, so that its figures belong together);
    of an even number of rounds, the better of the two in the middle."""
    for run, figure in ROUND_RUNS.items():
        rounds = sorted(result["rounds"][run], key=lambda measured: measured[figure])
        if rounds:
            result[run] = rounds[(len(rounds) - 1) // 2] if figure == "p50_ms" else rounds[len(rounds) // 2]
        if costs := [measured["cpu_us"] for measured in rounds if measured.get("cpu_us")]:
            result.setdefault("cpu", {})[run] = statistics.median(costs)


# The gateway's CPU time per answer is compared in pairs of runs of the same round (the runs of a
# round take the targets in turn, so that the two of a pair are seconds apart): the median of the
# rounds' ratios. Each target is compared with bare mitmdump (b) for non-streamed requests and
# with mitmdump streaming (c) for streams; meterproxy (d) with each peer too.
CPU_BASES = {"throughput": "b", "streams": "c"}


def paired_ratios(results: dict, key: str, base: str, run: str) -> list[float]:
    pairs = zip(get(results.get(key), "rounds", run) or [], get(results.get(base), "rounds", run) or [])
    return [mine["cpu_us"] / theirs["cpu_us"] for mine, theirs in pairs if mine.get("cpu_us") and theirs.get("cpu_us")]


def cpu_ratios(results: dict) -> None:
    """Each target's `cpu_ratio` by run, and meterproxy's to each peer (`cpu_to_peers`)."""
    for key, result in results.items():
        for run, base in CPU_BASES.items():
            if key != base and (ratios := paired_ratios(results, key, base, run)):
                result.setdefault("cpu_ratio", {})[run] = {
                    "to": base,
                    "rounds": [round(r, 3) for r in ratios],
                    "median": statistics.median(ratios),
                }
    for peer in "ef":
        for run in CPU_BASES:
            if ratios := paired_ratios(results, "d", peer, run):
                results["d"].setdefault("cpu_to_peers", {}).setdefault(peer, {})[run] = statistics.median(ratios)


def measure_paced(target: Target, result: dict, settings: argparse.Namespace) -> None:
    """This round's share of the paced streams (time to first byte)."""
    rounds = result.setdefault("ttfb_rounds", [])
    if "stream_error" in result or any("error" in measured for measured in rounds):
        return
    count = -(-settings.ttfb_streams // settings.rounds)
    step(target, f"paced TTFB, {count} streams")
    rounds.append(attempt(target, lambda: paced_ttfb(target, count)))


def measure_once(target: Target, result: dict, settings: argparse.Namespace) -> None:
    """The figures measured once: the big stream; and the summary of the paced streams."""
    if "stream_error" in result:
        return
    rounds = result.pop("ttfb_rounds", [])
    if rounds:
        failed = next((measured for measured in rounds if "error" in measured), None)
        result["ttfb"] = failed or ttfb_summary(rounds)
    if target.buffers_streams:
        result["big_stream"] = {"skipped": "bodies are buffered, not streamed"}
    else:
        step(target, f"one {settings.big_mb} MB stream, sampling RSS")
        limit = settings.big_timeout if target.key in OWN_TARGETS else min(settings.big_timeout, 60)
        result["big_stream"] = attempt(target, lambda: big_stream(target, settings.big_mb, limit))


def attempt(target: Target, measurement) -> dict:
    """One figure; its failure is recorded and the other figures go on."""
    try:
        return measurement()
    except (Exception, subprocess.SubprocessError) as error:
        print(f"  {target.key} {target.label}: FAILED: {error}", flush=True)
        return {"error": str(error)}


# --- where a stream's CPU time goes ------------------------------------------------------

# Profiled runs, and the targets profiled in each: meterproxy beside its base.
PROFILED = {"throughput": "bd", "streams": "cd"}


def profile_run(target: Target, fake: Fake, settings: argparse.Namespace, run: str, spec: tuple, work: Path) -> dict:
    """One more run with py-spy sampling the target: its CPU time per answer by phase
    (scripts/bench_profile.py), the stacks kept in bench-results/profile-<run>-<key>.txt."""
    import bench_profile

    if bench_profile.py_spy() is None:
        step(target, "no profile: py-spy not found (pip install py-spy)")
        return {"error": "py-spy not found"}
    body, connections, what = spec
    out = settings.out / f"profile-{run}-{target.key}.txt"
    step(target, f"{what} under py-spy, {settings.duration} s")
    spy = bench_profile.record(target.proc.pid, settings.duration + 1, out)
    time.sleep(0.5)  # py-spy attached
    before = bench_profile.thread_seconds(target.proc.pid)
    measured = wrk(target, fake, body, connections, settings.duration, work)
    after = bench_profile.thread_seconds(target.proc.pid)
    spy_output, _ = spy.communicate(timeout=60)
    if spy.returncode != 0 or not out.exists():
        step(target, f"no profile: py-spy failed ({spy.returncode}): {spy_output[-500:]}")
        return {"error": f"py-spy failed ({spy.returncode})"}
    samples = bench_profile.split(out.read_text(), f"{ROOT}/")
    split = bench_profile.report(samples, before, after, target.proc.pid, measured["requests"])
    step(
        target,
        f"CPU us per answer under py-spy {measured['cpu_us']:.0f}; event loop: "
        + ", ".join(f"{name} {us}" for name, us in split["event loop, by phase"].items())
        + "; other threads: "
        + (", ".join(f"{name} {us}" for name, us in split["other threads"].items()) or "none"),
    )
    return {"cpu_us": measured["cpu_us"], **split, "stacks": str(out)}


# --- the ledger writer micro-benchmark -----------------------------------------------------


def bench_writer(rows: int, producers: int) -> dict:
    """`rows` requests through LedgerWriter as the gateway does them: an awaited open job
    (authorize the token, hold on the wallet, pending row), then a completion job (update,
    release the hold, debit) that nobody waits for; from `producers` concurrent calls on one
    event loop, as the gateway's flows are."""
    from meterproxy.ids import new_id
    from meterproxy.store import Store, utc_now
    from meterproxy.token import decode_token, encode_token
    from meterproxy.writer import LedgerWriter
    from pricing.fees import ProductFees

    saved = os.sched_getaffinity(0)
    if PIN.enabled:
        os.sched_setaffinity(0, {PIN.target})
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as work:
        db = Path(work) / "ledger.sqlite"
        store = Store(db)
        merchant, secret_key = store.create_merchant("bench merchant")
        product, product_secret = store.create_product(merchant["id"], "bench product", ProductFees())
        wallet = store.create_wallet("bench wallet", Decimal("1000000"))
        connection, connection_secret = store.create_connection(merchant["id"], wallet["id"])
        store.close()
        token = decode_token(
            encode_token(secret_key=secret_key, connection_secret=connection_secret, product_secret=product_secret)
        )
        writer = LedgerWriter(db)
        hold, cost = Decimal("0.0000300000"), Decimal("0.0000045000")

        async def produce(count: int) -> None:
            for _ in range(count):
                request_id = new_id("req")
                row = {
                    "request_id": request_id,
                    "provider": "openai",
                    "endpoint": "chat/completions",
                    "key_mode": "managed",
                    "model": MODEL,
                    "connection_id": connection["id"],
                    "product_id": product["id"],
                    "merchant_id": merchant["id"],
                    "wallet_id": wallet["id"],
                    "metadata": {"user": "bench"},
                    "stream": False,
                    "cache_hit": False,
                    "attempts": 1,
                    "created_at": utc_now(),
                }

                def admit(store: Store, row=row) -> None:
                    store.authorize(token)
                    store.open_request(row, hold)

                await writer.call(admit)
                fields = {
                    "upstream_status": 200,
                    "provider_response_id": "chatcmpl-bench",
                    "completed_at": utc_now(),
                    "latency_ms": 3,
                    "ttfb_ms": 2,
                    "model": MODEL,
                    "attempts": 1,
                    "input_tokens": 12,
                    "output_tokens": 5,
                    "cached_input_tokens": 0,
                    "cache_write_tokens": 0,
                    "reasoning_tokens": 0,
                    "usage_source": "provider",
                    "status": "completed",
                    "error_message": None,
                    "total_cost": "0.0000045000",
                    "wallet_cost": "0.0000045000",
                    "merchant_cost": "0.0000000000",
                }
                writer.post(lambda store, rid=request_id, f=fields: store.complete_request(rid, f, wallet["id"], cost))

        per_producer = [rows // producers + (1 if i < rows % producers else 0) for i in range(producers)]

        async def run_all() -> None:
            await asyncio.gather(*(produce(n) for n in per_producer))
            writer.stop()  # every queued completion committed

        started = time.perf_counter()
        try:
            asyncio.run(run_all())
        finally:
            os.sched_setaffinity(0, saved)
        elapsed = time.perf_counter() - started
        summary = ledger_summary(db)
    completed = summary["rows"].get("completed", 0)
    if completed != rows or summary["open_holds"]:
        raise RuntimeError(f"writer benchmark: expected {rows} completed rows, got {summary}")
    return {"rows": rows, "producers": producers, "seconds": round(elapsed, 3), "rows_per_s": rows / elapsed}


# --- report ------------------------------------------------------------------------------


def get(result: dict | None, *path: str):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


# (key, label, path in a target's result, baseline target, decimals)
FIGURES = [
    ("rps", "req/s, c={c}", ("throughput", "per_s"), "b", 0),
    ("p50", "p50 ms, c={c}", ("throughput", "p50_ms"), "b", 2),
    ("p99", "p99 ms, c={c}", ("throughput", "p99_ms"), "b", 2),
    ("p50_c1", "p50 ms, c=1", ("concurrency_1", "p50_ms"), "b", 2),
    ("cpu_req", "CPU us per request, c={c}", ("cpu", "throughput"), "b", 0),
    ("sps", "streams/s, c={c}, 20 chunks", ("streams", "per_s"), "c", 0),
    ("cpu_stream", "CPU us per stream, c={c}", ("cpu", "streams"), "c", 0),
    ("ttfb", "paced TTFB p50 ms (5 ms/chunk)", ("ttfb", "ttfb_p50_ms"), "c", 2),
    ("rss", "{mb} MB stream: RSS growth MB", ("big_stream", "rss_growth_mb"), "c", 1),
    ("mbps", "{mb} MB stream: MB/s", ("big_stream", "mb_per_s"), "c", 1),
]
CHART_FIGURES = ("rps", "p50", "p99", "p50_c1", "cpu_req", "sps", "cpu_stream", "ttfb", "mbps")


def cpu_per_request(result: dict | None) -> float | None:
    """The target's CPU time (µs) per non-streamed request at 16 connections, median of the rounds."""
    return get(result, "cpu", "throughput")


def checks(results: dict, writer: dict | None) -> list[dict]:
    def value(key: str, figure: str):
        spec = next(f for f in FIGURES if f[0] == figure)
        return get(results.get(key), *spec[2])

    def check(name, got, wanted, ok, shown):
        return {
            "check": name,
            "value": got,
            "target": wanted,
            "pass": None if got is None else ok,
            "shown": shown if got is not None else "n/a",
        }

    out = []
    d, b = value("d", "rps"), value("b", "rps")
    r = d / b if d is not None and b else None
    out.append(
        check("non-streamed throughput d/b", r, ">= 0.85", r is not None and r >= 0.85, f"{r:.2f}x" if r else "")
    )
    d, b = value("d", "p50_c1"), value("b", "p50_c1")
    r = d - b if d is not None and b is not None else None
    out.append(
        check(
            "p50 at concurrency 1, d - b",
            r,
            "<= 0.3 ms",
            r is not None and r <= 0.3,
            f"{r:+.2f} ms" if r is not None else "",
        )
    )
    for run, name, limit in (("throughput", "CPU per request d/b", 1.10), ("streams", "CPU per stream d/c", 1.20)):
        r = get(results.get("d"), "cpu_ratio", run, "median")
        out.append(check(name, r, f"<= {limit:.2f}", r is not None and r <= limit, f"{r:.2f}x" if r else ""))
    d, c = value("d", "sps"), value("c", "sps")
    r = d / c if d is not None and c else None
    out.append(check("streams/s d/c", r, ">= 0.90", r is not None and r >= 0.90, f"{r:.2f}x" if r else ""))
    d, c = value("d", "ttfb"), value("c", "ttfb")
    r = d - c if d is not None and c is not None else None
    out.append(
        check("paced TTFB, d - c", r, "<= 1 ms", r is not None and r <= 1.0, f"{r:+.2f} ms" if r is not None else "")
    )
    r = value("d", "rss")
    out.append(
        check(
            "big stream RSS growth of d", r, "< 30 MB", r is not None and r < 30, f"{r:.1f} MB" if r is not None else ""
        )
    )
    d, live = value("d", "rps"), value("l", "rps")
    r = live / d if live is not None and d else None
    out.append(
        check("throughput with a live page l/d", r, ">= 0.95", r is not None and r >= 0.95, f"{r:.2f}x" if r else "")
    )
    # The same comparison, robust to a busy machine: the target's CPU time per request.
    d, live = cpu_per_request(results.get("d")), cpu_per_request(results.get("l"))
    r = live / d if live is not None and d else None
    out.append(
        check(
            "CPU per request with a live page l/d", r, "<= 1.05", r is not None and r <= 1.05, f"{r:.3f}x" if r else ""
        )
    )
    r = get(writer, "rows_per_s")
    out.append(check("ledger writer rows/s", r, ">= 5000", r is not None and r >= 5000, f"{r:,.0f}/s" if r else ""))
    return out


def figure_ratio(results: dict, key: str, path: tuple, base_value) -> float | None:
    """A figure's ratio to its base target: for CPU time, the median of the rounds' ratios."""
    if path[0] == "cpu":
        return get(results.get(key), "cpu_ratio", path[1], "median")
    value = get(results.get(key), *path)
    return value / base_value if value is not None and base_value else None


def table(results: dict, settings: argparse.Namespace, writer: dict | None) -> str:
    keys = [k for k in ALL_TARGETS if k in results]
    verdicts = {c["check"]: c for c in checks(results, writer)}
    by_figure = {
        "rps": "non-streamed throughput d/b",
        "p50_c1": "p50 at concurrency 1, d - b",
        "sps": "streams/s d/c",
        "cpu_req": "CPU per request d/b",
        "cpu_stream": "CPU per stream d/c",
        "ttfb": "paced TTFB, d - c",
        "rss": "big stream RSS growth of d",
    }
    header = ["figure", *[f"{k} {results[k]['label']}" for k in keys], "target (d)", "d", ""]
    rows = [header]
    for figure, label, path, base, decimals in FIGURES:
        base_value = get(results.get(base), *path)
        cells = [label.format(c=settings.connections, mb=settings.big_mb)]
        for k in keys:
            v = get(results.get(k), *path)
            if v is None:
                cells.append(get(results.get(k), "error") and "failed" or "-")
                continue
            text = f"{v:,.{decimals}f}"
            if path[0] == "big_stream" and get(results.get(k), "big_stream", "complete") is False:
                text += "*"
            if (ratio := figure_ratio(results, k, path, base_value)) is not None:
                text += f" ({ratio:.2f})"
            cells.append(text)
        verdict = verdicts.get(by_figure.get(figure, ""))
        if verdict:
            cells += [verdict["target"], verdict["shown"], {True: "PASS", False: "FAIL", None: "n/a"}[verdict["pass"]]]
        else:
            cells += ["", "", ""]
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    for name in ("throughput with a live page l/d", "CPU per request with a live page l/d"):
        live = verdicts[name]
        if live["value"] is not None:
            verdict = "PASS" if live["pass"] else "FAIL"
            lines.append(f"{name}: {live['shown']}   target {live['target']}   {verdict}")
    for k in keys:
        for run, ratio in (get(results.get(k), "cpu_ratio") or {}).items():
            rounds = "/".join(f"{r:.2f}" for r in ratio["rounds"])
            lines.append(f"  CPU {k}/{ratio['to']} {run}, each round: {rounds}")
    if spread := [
        f"{k} " + "/".join(f"{ms:.2f}" for ms in rounds)
        for k in keys
        if (rounds := get(results.get(k), "ttfb", "rounds_p50_ms"))
    ]:
        lines.append("  paced TTFB p50 ms, each round: " + ", ".join(spread))
    if settings.rounds > 1:
        lines.append(f"each wrk figure: the median of {settings.rounds} rounds, interleaved across targets:")
        for run, figure in ROUND_RUNS.items():
            spread = [
                f"{k} " + "/".join(f"{measured[figure]:,.{2 if figure == 'p50_ms' else 0}f}" for measured in rounds)
                for k in keys
                if (rounds := get(results.get(k), "rounds", run))
            ]
            lines.append(f"  {run} {figure}: " + ", ".join(spread))
    for peer, runs in (get(results.get("d"), "cpu_to_peers") or {}).items():
        lines.append(
            f"CPU time, d meterproxy / {peer} {results[peer]['label']} (median of the rounds' ratios): "
            + ", ".join(f"{'per request' if run == 'throughput' else 'per stream'} {r:.2f}" for run, r in runs.items())
        )
    w = verdicts["ledger writer rows/s"]
    if writer:
        lines.append(
            f"ledger writer: {writer['rows']:,} rows (open + complete) from {writer['producers']} concurrent calls: "
            f"{writer['rows_per_s']:,.0f} rows/s   target >= 5,000   "
            f"{ {True: 'PASS', False: 'FAIL', None: 'n/a'}[w['pass']] }"
        )
    lines.append(
        "(ratios in parentheses: to b for non-streamed figures, to c for streamed ones; "
        "latencies and RSS: lower is better)"
    )
    if any(get(results.get(k), "big_stream", "complete") is False for k in keys):
        lines.append("* the big stream was cut at its time limit: figures over the part that passed")
    return "\n".join(lines)


# --- a small PNG chart, no dependencies ----------------------------------------------------

FONT = {  # 5x7 glyphs, rows top to bottom
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "####. ....# ....# .###. ....# ....# ####.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": ".###. #.... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ....# .###.",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    " ": "..... ..... ..... ..... ..... ..... .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
COLOURS = {
    "a": (150, 150, 150),
    "b": (70, 110, 190),
    "w": (40, 60, 120),
    "c": (110, 170, 230),
    "n": (240, 180, 120),
    "d": (220, 110, 40),
    "l": (180, 60, 30),
    "e": (90, 170, 90),
    "f": (160, 90, 170),
}


class Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: tuple) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        row = bytes(colour) * (x1 - x0)
        for y in range(y0, y1):
            start = (y * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 2) -> None:
        for char in text.upper():
            rows = FONT.get(char, FONT["?"]).split()
            for r, bits in enumerate(rows):
                for c, bit in enumerate(bits):
                    if bit == "#":
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, colour)
            x += 6 * scale

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return len(text) * 6 * scale - scale

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        stride = self.width * 3
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


def chart(results: dict, settings: argparse.Namespace, path: Path) -> None:
    keys = [k for k in ALL_TARGETS if k in results]
    figures = [f for f in FIGURES if f[0] in CHART_FIGURES]
    names = {
        "rps": "REQ/S",
        "p50": "P50",
        "p99": "P99",
        "p50_c1": "P50 C=1",
        "cpu_req": "CPU/REQ",
        "sps": "STREAMS/S",
        "cpu_stream": "CPU/STREAM",
        "ttfb": "TTFB",
        "mbps": "BIG MB/S",
    }
    ratios = {}
    for figure, _, fpath, base, _ in figures:
        base_value = get(results.get(base), *fpath)
        for k in keys:
            ratios[figure, k] = figure_ratio(results, k, fpath, base_value)
    top = max([1.2, *[r * 1.15 for r in ratios.values() if r is not None]])
    top = min(top, 4.0)
    pitch = 28
    group_w = max(36 + pitch * len(keys), max(Canvas.text_width(name) for name in names.values()) + 24)
    bar_w, left, right, plot_top, plot_bottom = 22, 70, 20, 110, 440
    title = "METERPROXY BENCH: EACH FIGURE AS A RATIO TO B (NON-STREAMED) OR C (STREAMED)"
    canvas = Canvas(max(left + right + group_w * len(figures), Canvas.text_width(title) + left + right), 520)
    canvas.text(left, 12, title)
    canvas.text(
        left,
        34,
        f"{settings.connections} CONNECTIONS, {settings.duration} S RUNS. LATENCY: LOWER IS "
        "BETTER. " + ("PINNED, 1 CPU EACH" if PIN.enabled else "UNPINNED"),
        (80, 80, 80),
    )
    x = left
    for k in keys:  # legend
        canvas.rect(x, 64, x + 14, 78, COLOURS[k])
        label = f"{k} {results[k]['label']}"
        canvas.text(x + 20, 64, label)
        x += 20 + canvas.text_width(label) + 24
    scale_y = (plot_bottom - plot_top) / top
    step = 0.5 if top <= 2.5 else 1.0
    tick = 0.0
    while tick <= top + 1e-9:
        y = round(plot_bottom - tick * scale_y)
        canvas.rect(left, y, canvas.width - right, y + 1, (225, 225, 225) if tick != 1.0 else (0, 0, 0))
        canvas.text(left - 8 - canvas.text_width(f"{tick:.1f}"), y - 7, f"{tick:.1f}", (80, 80, 80))
        tick += step
    for g, (figure, *_rest) in enumerate(figures):
        x0 = left + g * group_w + (group_w - pitch * len(keys)) // 2
        for i, k in enumerate(keys):
            r = ratios[figure, k]
            if r is None:
                continue
            bx = x0 + i * pitch
            y = round(plot_bottom - min(r, top) * scale_y)
            canvas.rect(bx, y, bx + bar_w, plot_bottom, COLOURS[k])
            label = f"{r:.2f}" if r < 10 else f"{r:.0f}"
            canvas.text(bx + bar_w // 2 - canvas.text_width(label, 1) // 2, y - 10, label, (40, 40, 40), scale=1)
        name = names[figure]
        canvas.text(left + g * group_w + group_w // 2 - canvas.text_width(name) // 2, plot_bottom + 12, name)
    canvas.rect(left, plot_bottom, canvas.width - right, plot_bottom + 2, (0, 0, 0))
    clipped = any(r is not None and r > top for r in ratios.values())
    canvas.text(
        left,
        plot_bottom + 40,
        f"BIG = ONE {settings.big_mb} MB STREAM." + (f" BARS CLIPPED AT {top:.1f}." if clipped else ""),
        (80, 80, 80),
    )
    path.write_bytes(canvas.png())


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (default 4)")
    parser.add_argument(
        "--rounds", type=int, help="rounds of the wrk figures, interleaved across targets (default 3; --quick: 1)"
    )
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--ttfb-streams", type=int, default=50, help="paced streams for TTFB (default 50)")
    parser.add_argument("--big-mb", type=int, default=100, help="content size of the big stream (default 100)")
    parser.add_argument(
        "--big-timeout",
        type=float,
        default=120,
        help="seconds before the big stream is cut (peers: at most 60; default 120)",
    )
    parser.add_argument("--writer-rows", type=int, default=20000, help="rows for the writer benchmark")
    parser.add_argument("--writer-calls", type=int, default=16, help="concurrent calls in the writer benchmark")
    parser.add_argument(
        "--targets",
        default=OWN_TARGETS,
        help="which of a, b, w, c, n, d, l (and the peers e, f) to run (default all but the peers)",
    )
    parser.add_argument("--peers", action="store_true", help="add LiteLLM's proxy (e) and Portkey's gateway (f)")
    parser.add_argument("--writer-only", action="store_true", help="only the ledger writer micro-benchmark")
    parser.add_argument(
        "--cpu-only",
        action="store_true",
        help="only the runs that give CPU time per request and per stream (no c=1 run, TTFB, big stream or writer)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, one more non-streamed run of b and d and stream run of c and d under py-spy "
        "(needs py-spy on PATH or in the venv, and ptrace: root): bench-results/profile-<run>-<target>.txt, "
        "the CPU split by phase",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (2 s runs, fewer streams)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="directory for bench.json/png")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.ttfb_streams, args.writer_rows = 2, 15, 5000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    args.duration, args.rounds = max(1, args.duration), max(1, args.rounds)
    return args


def main(argv: list[str]) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setup_pinning()
    settings.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"meterproxy bench: {PIN.note}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    if not settings.writer_only and shutil.which("wrk") is None:
        print(
            "wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu), then run again.", file=sys.stderr
        )
        return 2
    results: dict = {}
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "pinning": PIN.note,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "connections": settings.connections,
        "duration_s": settings.duration,
        "rounds": settings.rounds,
        "stream_chunks": STREAM_CHUNKS,
        "pace_s": PACE,
        "ttfb_streams": settings.ttfb_streams,
        "big_stream_mb": settings.big_mb,
        "loadavg_start": os.getloadavg(),
    }
    writer = None
    try:
        if not settings.writer_only:
            fake = Fake()
            max_tokens, reply = pick_max_tokens(fake)
            meta.update(
                max_tokens=max_tokens,
                reply_bytes=reply,
                wrk=subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0].strip(),
            )
            print(
                f"fake provider at {fake.url}; non-streamed reply {reply} bytes (max_tokens {max_tokens}), "
                f"streams of {STREAM_CHUNKS} chunks",
                flush=True,
            )
            starters = {
                "a": lambda: start_direct(fake),
                "b": lambda: start_mitmdump(fake),
                "w": lambda: start_mitmdump(fake, forward_addon=True),
                "c": lambda: start_mitmdump(fake, streaming=True),
                "n": lambda: start_meterproxy(fake, ledger=False),
                "d": lambda: start_meterproxy(fake),
                "l": lambda: start_meterproxy(fake, live_page=True),
                "e": lambda: start_litellm(fake, settings.out),
                "f": lambda: start_portkey(fake, settings.out),
            }
            keys = [k for k in ALL_TARGETS if k in settings.targets or (settings.peers and k in "ef")]
            targets: dict[str, Target] = {}
            with tempfile.TemporaryDirectory(prefix="bench-wrk-") as work:
                try:
                    for key in keys:
                        print(f"[{key}] starting", flush=True)
                        try:
                            targets[key] = starters[key]()
                            results[key] = prepare(targets[key], fake, settings, max_tokens, Path(work))
                        except (Exception, subprocess.SubprocessError) as error:
                            print(f"[{key}] UNAVAILABLE: {error}", flush=True)
                            label = {"e": "litellm", "f": "portkey"}.get(key, key)
                            results[key] = {"label": label, "error": str(error)}
                            if key in targets:
                                targets.pop(key).stop()
                    runs = round_runs(settings, max_tokens)
                    for turn in range(settings.rounds):  # interleaved, so that a slow spell hits every target
                        print(f"[round {turn + 1} of {settings.rounds}]", flush=True)
                        for run, spec in runs.items():
                            for key, target in targets.items():
                                measure_run(target, results[key], fake, settings, run, spec, Path(work))
                        if not settings.cpu_only:
                            for key, target in targets.items():
                                measure_paced(target, results[key], settings)
                    for key, target in targets.items():
                        settle_rounds(results[key])
                        if not settings.cpu_only:
                            measure_once(target, results[key], settings)
                    cpu_ratios(results)
                    if settings.profile:
                        for run, keys in PROFILED.items():
                            for key in keys:
                                if key in targets:
                                    results[key].setdefault("profile", {})[run] = profile_run(
                                        targets[key], fake, settings, run, runs[run], Path(work)
                                    )
                finally:
                    for key, target in targets.items():
                        target.stop()
                        if target.ledger is not None:
                            results[key]["ledger"] = target.ledger
                            print(f"  d meterproxy ledger: {target.ledger}", flush=True)
            fake.stop()
        if not settings.cpu_only:
            print(f"[writer] {settings.writer_rows:,} rows from {settings.writer_calls} concurrent calls", flush=True)
            writer = bench_writer(settings.writer_rows, settings.writer_calls)
    finally:
        stop_all()
    meta["loadavg_end"] = os.getloadavg()
    meta["seconds"] = round(time.time() - started, 1)
    report = {"meta": meta, "targets": results, "writer": writer, "checks": checks(results, writer)}
    if settings.writer_only:
        (settings.out / "writer.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        verdict = "PASS" if writer["rows_per_s"] >= 5000 else "FAIL"
        print(
            f"ledger writer: {writer['rows']:,} rows (open + complete) from {writer['producers']} concurrent calls: "
            f"{writer['rows_per_s']:,.0f} rows/s (target >= 5,000: {verdict})"
            f"; {PIN.note}; wrote {settings.out / 'writer.json'}"
        )
        return 0
    (settings.out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(table(results, settings, writer))
    measured = [k for k in results if "error" not in results[k]]
    if measured:
        load = (
            max(
                (get(results[k], run, "load_cpu") or 0)
                for k in measured
                if k != "a"
                for run in ("throughput", "streams")
            )
            if any(k != "a" for k in measured)
            else None
        )
        target_cpu = {k: get(results[k], "throughput", "target_cpu") for k in measured}
        print(
            f"target CPU use during the c={settings.connections} run (1.0 = one core): "
            + ", ".join(f"{k} {v:.2f}" for k, v in target_cpu.items() if v is not None)
        )
        if load is not None:
            print(
                f"load side (fake provider + wrk on the other CPU) at most {load:.2f} of a core"
                + ("  <- near saturation: the load side may be the bottleneck" if load > 0.9 else "")
            )
        chart(results, settings, settings.out / "bench.png")
    for k in results:
        for note in results[k].get("notes", []):
            print(f"{k}: {note}")
    print(
        f"{PIN.note}; load average {meta['loadavg_start'][0]:.2f} -> {meta['loadavg_end'][0]:.2f} "
        f"(other work on the machine makes figures noisy)"
    )
    print(
        f"wrote {settings.out / 'bench.json'}"
        + (f" and {settings.out / 'bench.png'}" if measured else "")
        + f" in {meta['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    ensure_venv()
    sys.path.insert(0, str(ROOT))
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
