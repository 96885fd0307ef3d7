"""Legacy clients and inspection (SPEC §1.3): the explicit proxy, transparent mode and mitmweb.

A client calling a provider's real https URL through the proxy is metered like /v1/forward;
every other host the passthrough policy allows passes through as raw bytes, with no row and no
audit entry (tests/test_destinations.py: what it refuses).
"""

import datetime
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

import genai_prices
import httpx2
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import io

from meterproxy.token import encode_token
from pricing.fees import ProductFees
from tests.harness import MANAGED_KEYS, ROOT, Gateway, make_account, secret, wait_until
from tests.leaks import HANDOFF

MESSAGES = [{"role": "user", "content": "metered through the proxy"}]
PROMPT_TOKENS = 3 + 3 + 4  # the fake provider's formula


def dollars(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.0000000001')):f}"


@pytest.fixture
def proxied(gateway, monkeypatch):
    """The environment of a legacy client: HTTPS_PROXY, and mitmproxy's CA trusted."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", gateway.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(gateway.ca_cert))


def test_an_unmodified_sdk_through_https_proxy_is_metered_exactly(gateway, fake, proxied):
    fees = ProductFees(fixed_fee=Decimal("0.0005"))
    account = make_account(gateway.store, fees)
    client = openai.OpenAI(api_key=account.token(), max_retries=0)  # base_url stays https://api.openai.com/v1
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()

    assert completion.choices[0].message.content == "w0 w1 w2 w3 w4"
    [seen] = fake.requests()
    assert dict(seen["headers"])["authorization"] == f"Bearer {MANAGED_KEYS['OPENAI_API_KEY']}"
    assert account.token() not in json.dumps(seen)
    row = gateway.row(raw.headers["x-lava-request-id"])
    usage = genai_prices.Usage(input_tokens=PROMPT_TOKENS, output_tokens=5)
    provider_cost = genai_prices.calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price
    assert row == {
        **row,
        "status": "completed",
        "provider": "openai",
        "endpoint": "POST https://api.openai.com/v1/chat/completions",
        "key_mode": "managed",
        "connection_id": account.connection_id,
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": 5,
        "total_cost": dollars(provider_cost + Decimal("0.0005")),
        "wallet_cost": dollars(provider_cost + Decimal("0.0005")),
    }


def test_a_client_with_its_own_provider_key_is_metered_and_charged_to_nobody(gateway, fake, proxied):
    own_key = secret("sk-proj-developer-own-key-5e1d")
    client = openai.OpenAI(api_key=own_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    [seen] = fake.requests()
    assert dict(seen["headers"])["authorization"] == f"Bearer {own_key}"
    row = gateway.row(raw.headers["x-lava-request-id"])
    usage = genai_prices.Usage(input_tokens=PROMPT_TOKENS, output_tokens=5)
    provider_cost = genai_prices.calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price
    assert (row["key_mode"], row["merchant_id"], row["connection_id"], row["status"]) == (
        "unmanaged",
        None,
        None,
        "completed",
    )
    assert (row["total_cost"], row["wallet_cost"], row["merchant_cost"]) == (
        dollars(provider_cost),
        "0.0000000000",
        "0.0000000000",
    )


def test_callers_with_their_own_keys_never_share_cached_answers(gateway, fake, proxied):
    answers = []
    for own_key in (secret("sk-proj-first-caller-0a11"), secret("sk-proj-second-caller-0b22")):
        client = openai.OpenAI(api_key=own_key, max_retries=0, default_headers={"x-meterproxy-cache": "on"})
        answers.append(client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES))
    assert [dict(seen["headers"])["authorization"] for seen in fake.requests()] == [
        "Bearer sk-proj-first-caller-0a11",
        "Bearer sk-proj-second-caller-0b22",
    ]
    assert [raw.headers.get("x-meterproxy-cache") for raw in answers] == [None, None]
    assert answers[0].parse().id != answers[1].parse().id


def test_a_bad_forward_token_through_the_proxy_is_refused_not_passed_on_as_a_provider_key(gateway, fake, proxied):
    account = make_account(gateway.store)
    # A token with its product left out: it is still a token, with the merchant's secrets in it.
    broken = secret(encode_token(secret_key=account.secret_key, connection_secret=account.connection_secret))
    audited = len(gateway.audit())
    client = openai.OpenAI(api_key=broken, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert refused.value.body["code"] == "invalid_token"
    assert fake.requests() == []
    [entry] = gateway.audit_since(audited)
    assert (entry["status"], entry["code"], entry["target_host"]) == (401, "invalid_token", "api.openai.com")


# --- other hosts: raw bytes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_echo_server(tmp_path_factory):
    """An HTTPS server on loopback with its own self-signed certificate, echoing each request."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echo.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("echo.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("echo")
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with context.wrap_socket(connection, server_side=True) as tls:
                received = tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(received))
                tls.sendall(received)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], folder / "cert.pem"
    listener.close()


@pytest.fixture(scope="module")
def trusting_gateway(fake, tmp_path_factory):
    """A gateway on a trusted network (`meterproxy_passthrough=all`): loopback hosts pass too."""
    gateway = Gateway(tmp_path_factory.mktemp("all"), fake, args=("--set", "meterproxy_passthrough=all"))
    yield gateway
    gateway.stop()


def test_passthrough_all_is_warned_about_at_start(trusting_gateway):
    warning = "meterproxy_passthrough=all: the proxy relays to any address"
    wait_until(lambda: warning in "".join(trusting_gateway.output), "the warning, logged once the proxy runs")


def test_a_host_that_is_not_a_provider_passes_byte_for_byte(trusting_gateway, fake, tls_echo_server):
    gateway, (port, certificate) = trusting_gateway, tls_echo_server
    rows, audit = len(gateway.rows()), len(gateway.audit())
    tunnel = socket.create_connection(("127.0.0.1", gateway.port))
    tunnel.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert tunnel.recv(4096).startswith(b"HTTP/1.1 200")
    # Only the server's own certificate is trusted: had the proxy intercepted, the handshake fails.
    context = ssl.create_default_context(cafile=certificate)
    with context.wrap_socket(tunnel, server_hostname="echo.test") as tls:
        sent = b"POST /v1/chat/completions HTTP/1.1\r\nHost: echo.test\r\nAuthorization: Bearer x\r\n\r\n\x00\xff"
        tls.sendall(sent)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.endswith(b"\r\n\r\n" + sent)
    # A refusal after it, audited: the ledger's writes are in order, so anything the tunnel made
    # the gateway write would be there before it.
    refused = httpx2.post(f"{gateway.url}/openai/v1/chat/completions", headers={"authorization": "Bearer x"})
    assert refused.status_code == 401
    [after] = gateway.audit_since(audit)
    assert (len(gateway.rows()), after["code"]) == (rows, "invalid_token")
    assert fake.requests() == []


# --- saved flows (mitmweb itself: tests/test_mitmweb.py) ------------------------------------


def test_flows_saved_as_they_end_carry_their_request_id_and_no_secret(fake, tmp_path):
    saved = tmp_path / "saved.flows"
    gateway = Gateway(tmp_path, fake, args=("--set", f"save_stream_file={saved}"))
    try:
        account = make_account(gateway.store)
        client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        streamed = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        list(streamed.parse())
        gateway.row(streamed.headers["x-lava-request-id"])
    finally:
        gateway.stop()
    assert "Addon error" not in "".join(gateway.output)  # mitmproxy copies a flow's metadata to save it
    with saved.open("rb") as file:
        flows = list(io.FlowReader(file).stream())
    assert [flow.metadata["meterproxy"]["request_id"] for flow in flows] == [
        raw.headers["x-lava-request-id"],
        streamed.headers["x-lava-request-id"],
    ]
    assert account.token().encode() not in saved.read_bytes()


# --- transparent mode ------------------------------------------------------------------------


def transparent_mode_unavailable() -> str | None:
    """Why this machine cannot run the transparent-mode test, or None."""
    if shutil.which("unshare") is None or shutil.which("iptables") is None:
        return "needs unshare and iptables (apt-get install iptables)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "iptables", "-t", "nat", "-L", "OUTPUT"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace with a NAT table here: {probe.stderr.strip() or probe.returncode}"
    return None


def local_capture_unavailable() -> str | None:
    """Why mitmproxy's local capture (`--mode local:<process>`, eBPF on Linux) cannot run here:
    started for a process that does not exist, it fails within seconds where the kernel or the
    sandbox refuses its eBPF programs (or sudo, which it runs its redirector with, is missing)."""
    if reason := transparent_mode_unavailable():
        return reason
    mitmdump = str(Path(sys.executable).with_name("mitmdump"))
    probe = subprocess.Popen(
        [mitmdump, "--mode", "local:meterproxy-no-such-process", "--set", "confdir=/tmp/meterproxy-local-probe"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        output, _ = probe.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        probe.terminate()
        output, _ = probe.communicate()
    lines = output.splitlines()
    fatal = [line for line in lines if re.search(r"Error: |Failed to run", line)]  # the cause, where it says
    failures = fatal or [line for line in lines if re.search(r"(?i)\bfail|error", line)]
    return f"local capture cannot start here: {failures[0].split('] ', 1)[-1].strip()}" if failures else None


@pytest.mark.parametrize("mode", ["transparent", "local"])
def test_a_client_that_knows_nothing_of_the_proxy_is_metered(mode):
    """Transparent mode (iptables) and local capture of a process by name (`--mode local:…`)."""
    reason = transparent_mode_unavailable() if mode == "transparent" else local_capture_unavailable()
    if reason:
        pytest.skip(reason)
    # Its report shows what the provider saw (the managed key): its gateway's traces are handed off.
    scenario = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "tests/transparent_scenario.py", mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert scenario.returncode == 0, scenario.stderr[-3000:]
    report = json.loads(scenario.stdout.strip().splitlines()[-1])
    handed_off = [json.loads(path.read_text()) for path in Path(os.environ[HANDOFF]).glob("*.json")]
    assert any(  # to the key-leak search: its gateway's traces, its account's secrets
        report["connection_id"] in text for handed in handed_off for text in handed["sources"].values()
    )
    assert report["content"] == "w0 w1 w2 w3 w4"
    [seen] = report["upstream"]
    assert dict(seen["headers"])["authorization"] == f"Bearer {MANAGED_KEYS['OPENAI_API_KEY']}"
    row = report["row"]
    usage = genai_prices.Usage(input_tokens=report["usage"]["prompt_tokens"], output_tokens=5)
    provider_cost = genai_prices.calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price
    assert (row["status"], row["provider"], row["endpoint"], row["key_mode"], row["connection_id"]) == (
        "completed",
        "openai",
        "POST https://api.openai.com/v1/chat/completions",
        "managed",
        report["connection_id"],
    )
    assert (row["input_tokens"], row["output_tokens"], row["total_cost"]) == (
        report["usage"]["prompt_tokens"],
        5,
        dollars(provider_cost),
    )
