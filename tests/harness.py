"""Real processes for integration tests: the fake provider and `mitmdump -s addons/gateway.py`,
each on a free loopback port, plus helpers to make accounts and read the ledger."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import openai

from meterproxy.limits import ProductLimits
from meterproxy.store import Store
from meterproxy.token import encode_token
from pricing.fees import ProductFees
from tests.leaks import LEAKS

ROOT = Path(__file__).resolve().parents[1]
MANAGED_KEYS = {
    "OPENAI_API_KEY": "sk-managed-openai-7f3a",
    "ANTHROPIC_API_KEY": "sk-ant-managed-51c2",
    "GEMINI_API_KEY": "AIza-managed-gemini-93d1",
    "MISTRAL_API_KEY": "managed-mistral-2b8e",
    "DEEPSEEK_API_KEY": "sk-managed-deepseek-c4f0",
    "XAI_API_KEY": "xai-managed-6e19",
}
# Everything secret that tests hand to a process, and everything a process leaves behind: the
# session's end searches the latter for the former (tests/leaks.py).
SECRETS: set[str] = LEAKS.secrets
SECRETS.update(MANAGED_KEYS.values())
GATEWAYS: list["Gateway"] = []


def secret(value: str) -> str:
    """Register a secret a test uses, so that the key-leak search looks for it."""
    return LEAKS.secret(value)


def run(command: list, **options) -> subprocess.CompletedProcess:
    """`subprocess.run` of a command whose output the key-leak search reads: text, captured."""
    result = subprocess.run(command, capture_output=True, text=True, **options)
    shown = [str(arg) if not any(value in str(arg) for value in SECRETS) else "…" for arg in command]
    LEAKS.watch(f"output of {' '.join(shown)[:200]}", lambda: result.stdout + result.stderr)
    return result


FAKE_PROVIDERS = ("openai", "anthropic", "google", "mistral", "deepseek", "xai")
SELF_HOSTED = "https://llm.selfhosted.test"  # added by the providers file; no managed key


def _start(command: list[str], pattern: str, env: dict | None = None) -> tuple[subprocess.Popen, re.Match, list[str]]:
    """Start a process and wait for the line that says where it listens; keep its output."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if match := re.search(pattern, line):
            break
    else:
        raise RuntimeError(f"{command[0]} did not start:\n{''.join(lines)}")
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, match, lines


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class FakeProvider:
    def __init__(self) -> None:
        self.process, match, self.output = _start(
            [sys.executable, "scripts/fake_provider.py", "--port", "0"], r"listening at 127\.0\.0\.1:(\d+)"
        )
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def _control(self, method: str, body: object = None, path: str | None = None) -> object:
        path = path or ("/_fake/behaviours" if method == "POST" else "/_fake/requests")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body))
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def behave(self, *behaviours: dict) -> None:
        """Script the next requests (fault injection, cached tokens, slow streams…)."""
        self._control("POST", list(behaviours))

    def requests(self) -> list[dict]:
        return self._control("GET")

    def reset(self) -> None:
        self._control("DELETE")

    def release(self) -> None:
        """Let the streams paused by the `pause_after` behaviour go on."""
        self._control("POST", path="/_fake/release")

    def stop(self) -> None:
        _stop(self.process)


class Gateway:
    """The real gateway: `mitmdump -s addons/gateway.py` (or mitmweb, or another copy of the
    script) with its own database and confdir; `args` go to the program (another `--mode`, say)."""

    def __init__(
        self,
        tmp: Path,
        fake: FakeProvider,
        program: str = "mitmdump",
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        more_providers: str = "",
        script: Path = ROOT / "addons" / "gateway.py",
        db: str | None = None,
    ):
        """`db`: the ledger (a PostgreSQL URL, say); by default a SQLite file in `tmp`."""
        self.db_path = tmp / "ledger.sqlite"
        self.db = db or str(self.db_path)
        self.ca_cert = tmp / "mitmproxy" / "mitmproxy-ca-cert.pem"  # what clients trust in proxy mode
        providers = tmp / "providers.toml"
        providers.write_text(
            "".join(f'[providers.{name}]\nupstream = "{fake.url}/{name}"\n\n' for name in FAKE_PROVIDERS)
            + f'[providers.selfhosted]\nbase_url = "{SELF_HOSTED}"\nupstream = "{fake.url}/openai"\n'
            + 'price_provider = "openai"\n'
            + more_providers
        )
        self.record = tmp / "responses.record"  # every response to a client (tests/leak_recorder.py)
        environment = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
        environment.update(MANAGED_KEYS, **(env or {}), METERPROXY_TEST_RECORD=str(self.record))
        for keys in [value for name, value in (env or {}).items() if name.endswith("_API_KEY")]:
            for key in keys.split(","):
                secret(key)
        self.process, match, self.output = _start(
            [
                str(Path(sys.executable).with_name(program)),
                *args,
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                "0",
                "--set",
                f"confdir={tmp / 'mitmproxy'}",
                "-s",
                str(script),
                "-s",
                "tests/leak_recorder.py",
                "--set",
                f"meterproxy_db={self.db}",
                "--set",
                f"meterproxy_providers={providers}",
            ],
            r"(?i)proxy listening at 127\.0\.0\.1:(\d+)",
            environment,
        )
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = Store(self.db)
        GATEWAYS.append(self)
        LEAKS.watch(f"gateway in {tmp}", self.traces)

    def traces(self) -> bytes:
        """All the gateway left behind: its database (files, or a PostgreSQL ledger's tables as
        they were when it stopped), its log output, its responses."""
        files = [*self.db_path.parent.glob(self.db_path.name + "*"), self.record]
        ledger = getattr(self, "ledger_text", b"")
        return b"".join(path.read_bytes() for path in files if path.exists()) + ledger + "".join(self.output).encode()

    def _ledger_tables(self) -> bytes:
        tables = ("merchants", "products", "wallets", "connections", "requests", "audit", "cache_entries")
        return "".join(repr(self.store.db.rows(f"SELECT * FROM {table}")) for table in tables).encode()

    def recorded(self) -> bytes:
        """What tests/leak_recorder.py wrote so far: request heads the gateway has read, and what
        it sent its clients (a response's head as soon as it is sent)."""
        return self.record.read_bytes() if self.record.exists() else b""

    def forward_base(self, provider_base: str) -> str:
        return f"{self.url}/v1/forward?u={provider_base}"

    def row(self, request_id: str, timeout: float = 10) -> dict:
        """The ledger row once it is no longer pending (completion is written off the event loop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.store.request(request_id)
            if row is not None and row["status"] != "pending":
                return row
            time.sleep(0.02)
        raise AssertionError(f"ledger row {request_id} not completed: {self.store.request(request_id)}")

    def rows(self) -> list[dict]:
        return list(self.store.db["requests"].rows)

    def audit(self) -> list[dict]:
        return list(self.store.db["audit"].rows)

    def audit_since(self, start: int, count: int = 1, timeout: float = 10) -> list[dict]:
        """The audit entries after the first `start`, once there are `count` of them (a refusal's
        entry is committed right after the client got its answer)."""
        deadline = time.monotonic() + timeout
        while len(entries := self.audit()[start:]) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return entries

    def stop(self) -> None:
        _stop(self.process)
        if self.db != str(self.db_path):  # not a file the key-leak search can read later
            try:
                self.ledger_text = self._ledger_tables()
            except Exception as unreadable:  # a test that stops PostgreSQL under its gateways
                self.ledger_text = f"(ledger unreadable at stop: {unreadable!r})".encode()
        self.store.close()


@dataclass
class Account:
    merchant_id: str
    wallet_id: str
    connection_id: str
    product_id: str
    secret_key: str
    connection_secret: str
    product_secret: str

    def token(self, provider_key: str | None = None, billed: bool = True) -> str:
        if provider_key:
            secret(provider_key)
        return secret(
            encode_token(
                secret_key=self.secret_key,
                connection_secret=self.connection_secret if billed else None,
                product_secret=self.product_secret if billed else None,
                provider_key=provider_key,
            )
        )


def make_account(
    store: Store,
    fees: ProductFees | None = None,
    balance: Decimal = Decimal("10"),
    limits: ProductLimits | None = None,
    cache_ttl: int = 0,
) -> Account:
    merchant, secret_key = store.create_merchant("test merchant")
    product, product_secret = store.create_product(
        merchant["id"], "test product", fees or ProductFees(), limits, cache_ttl
    )
    wallet = store.create_wallet("test wallet", balance)
    connection, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    SECRETS.update((secret_key, product_secret, connection_secret))
    return Account(
        merchant["id"], wallet["id"], connection["id"], product["id"], secret_key, connection_secret, product_secret
    )


def wait_until(condition, what: str, timeout: float = 30):
    """Poll until `condition()` is truthy and return it: the deadline only fails a test that hangs
    (the machine may be busy with other tests), never a slow one."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def stream_until_cut(client, messages: list[dict], model: str = "gpt-4o-mini", **options) -> tuple[str, str]:
    """Read an OpenAI chat stream that the provider cuts: its request id and the text delivered,
    the reasoning shown (`reasoning_content`) included. The client must see the cut too (the SDK
    raises APIConnectionError). `options` go to the request (`tools`, say)."""
    delivered = []
    try:
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, stream=True, **options
        ) as response:
            request_id = response.headers["x-lava-request-id"]
            for chunk in response.parse():
                delta = chunk.choices[0].delta
                delivered += [delta.model_extra.get("reasoning_content") or "", delta.content or ""]
    except openai.APIConnectionError:
        return request_id, "".join(delivered)
    raise AssertionError("the stream was not cut")


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to a loopback port (a proxy's, say) and read one answer whole: its status,
    headers (names in lower case) and body (by its content-length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            if not (chunk := connection.recv(65536)):
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def _content_length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0
