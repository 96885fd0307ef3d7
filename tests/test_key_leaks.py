"""No key, secret or forward token is ever written to the ledger, a log line or a response
(SPEC §2). The search itself runs at the session's end, over everything every gateway, command
and subprocess of the session left behind, for every secret the session's tests used
(tests/leaks.py); here one more gateway goes through traffic of every kind, and the search is
shown to find a secret escaped in any of the ways it looks for, whatever order files run in."""

import base64
import json
import subprocess
import sys
from urllib.parse import quote

import httpx2
import openai
import pytest

from tests.harness import GATEWAYS, MANAGED_KEYS, ROOT, SECRETS, Gateway, make_account, secret
from tests.leaks import LEAKS, LeakCollector


@pytest.fixture(scope="module")
def busy_gateway(fake, tmp_path_factory):
    """Calls of every kind: modes, streams, providers' routes, refusals, the metering API."""
    gateway = Gateway(tmp_path_factory.mktemp("leaks"), fake, args=("--set", "flow_detail=3"))
    account = make_account(gateway.store)
    messages = [{"role": "user", "content": "keep my secrets"}]
    tokens = [
        account.token(),
        account.token(provider_key="sk-byok-leak-check-31"),
        account.token(provider_key="sk-meter-leak-52", billed=False),
    ]
    for token in tokens:
        client = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    google = f"{gateway.url}/google/v1beta/models/gemini-2.5-flash:generateContent"
    for key in (tokens[0], quote(tokens[0], safe="")):  # as it is, and percent-encoded as a client may send it
        httpx2.post(f"{google}?key={key}", json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    for bad in (secret("sk-not-a-token-7781"), tokens[0][:-4]):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=bad, max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=messages
            )
    fake.behave(
        {"status": 401, "body": {"error": {"message": f"Incorrect API key provided: {MANAGED_KEYS['OPENAI_API_KEY']}"}}}
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=tokens[0], max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=messages
        )
    # Refused before the token could be taken off: a bad metadata header, the token in a raw `u`'s
    # own query; a base URL with a typo, the token in its header.
    gemini = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    refused = httpx2.post(
        f"{gateway.url}/v1/forward?u={gemini}?key={tokens[0]}", headers={"x-lava-metadata": "[]"}, json={}
    )
    typo = httpx2.post(f"{gateway.url}/opanai/v1/chat/completions", headers={"authorization": f"Bearer {tokens[0]}"})
    assert (refused.status_code, typo.status_code, typo.json()["error"]["code"]) == (400, 404, "unknown_endpoint")
    upstream = str(fake.requests())
    httpx2.post(
        f"{gateway.url}/v1/requests",
        headers={"authorization": f"Bearer {account.secret_key}"},
        json={
            "connection_secret": account.connection_secret,
            "product_secret": account.product_secret,
            "model": "gpt-4o-mini",
            "provider": "openai",
            "input_tokens": 3,
        },
    )
    yield gateway, upstream
    gateway.stop()


def test_the_search_would_find_a_leak(busy_gateway):
    """The positive control: the keys did travel (to the provider), and the traces hold the
    responses, the ledger and the log."""
    gateway, upstream = busy_gateway
    assert MANAGED_KEYS["OPENAI_API_KEY"] in upstream and "sk-byok-leak-check-31" in upstream
    traces = gateway.traces()
    assert b"chat.completion.chunk" in traces  # responses, streams included
    assert b"x-lava-request-id" in traces and b"gpt-4o-mini" in traces
    assert b"Incorrect API key provided" in traces  # the provider's error, with the key scrubbed
    log = "".join(gateway.output)
    assert log.count("/google/v1beta/models/gemini-2.5-flash:generateContent") == 2  # logged, ?key= taken off
    assert len(SECRETS) > 10 and gateway in GATEWAYS


def test_every_gateway_of_the_session_is_searched(busy_gateway):
    gateway, _ = busy_gateway
    watched = [source.__self__ for source in LEAKS.sources.values() if hasattr(source, "__self__")]
    assert all(any(other is gateway for other in watched) for gateway in GATEWAYS)


SECRET = "eyJzZWNyZXRfa2V5IjoibXNrX3BsYW50ZWQifQ/+=="  # with characters that every escaping changes


@pytest.mark.parametrize(
    "written",
    [
        SECRET,
        quote(SECRET, safe=""),
        quote(SECRET, safe="").replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d"),
        json.dumps({"token": SECRET}).replace("/", "\\/"),  # as PHP and some loggers write JSON
        base64.b64encode(b"Bearer " + SECRET.encode()).decode(),
        base64.b64encode(b"key=" + SECRET.encode()).decode(),
        base64.urlsafe_b64encode(b"x" + SECRET.encode() + b"y").decode(),
    ],
    ids=["as-is", "url", "url-lower-hex", "json-slashes", "base64-0", "base64-1", "urlsafe-base64-2"],
)
def test_the_search_finds_a_secret_however_it_is_escaped(written):
    collector = LeakCollector()
    collector.secret(SECRET)
    collector.watch("a log", lambda: f"127.0.0.1 GET /v1/forward?x={written} 200\n")
    collector.watch("a clean log", lambda: b"x" * 1_000_000)
    assert [(leak.source, leak.secret) for leak in collector.leaks()] == [("a log #0", SECRET)]


PLANTED_IN_A_LOG = """
from urllib.parse import quote
from tests.harness import LEAKS, secret

def test_a_token_percent_encoded_in_a_log_line():
    token = secret("eyJzZWNyZXRfa2V5IjoibXNrX2xvZyJ9/+=")
    log = ["127.0.0.1:50312: GET /google/v1beta/models/gemini:generateContent?key=" + quote(token, safe="")]
    LEAKS.watch("a gateway's log", lambda: "\\n".join(log))
"""
PLANTED_IN_A_SUBPROCESS = """
import sys
from tests.harness import run, secret

def test_a_token_in_the_output_of_a_subprocess():
    token = secret("sk-planted-in-a-subprocess-7a1f")
    assert run([sys.executable, "-c", f"import json; print(json.dumps({{'k': {token!r}}}))"]).returncode == 0
"""
CLEAN = """
from tests.harness import run, secret

def test_nothing_planted():
    secret("sk-never-written-anywhere-5b2e")
    assert run(["echo", "nothing to see"]).stdout == "nothing to see\\n"
"""


def inner_session(folder, *files: str) -> subprocess.CompletedProcess:
    """A pytest session of its own, with the key-leak plugin, over `files` in that order."""
    command = [sys.executable, "-m", "pytest", "-p", "tests.leaks", "-p", "no:cacheprovider", "-q", *files]
    environment = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("order", ["planted-first", "planted-last"])
def test_a_session_finds_leaks_planted_in_a_log_and_a_subprocess_whatever_order_files_run_in(tmp_path, order):
    files = {"test_log.py": PLANTED_IN_A_LOG, "test_subprocess.py": PLANTED_IN_A_SUBPROCESS, "test_clean.py": CLEAN}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    planted, clean = ["test_log.py", "test_subprocess.py"], ["test_clean.py"]
    session = inner_session(tmp_path, *(planted + clean if order == "planted-first" else clean + planted))
    report = session.stdout + session.stderr
    assert session.returncode == 1 and "3 passed, 1 error" in report, report
    assert "eyJzZW… (URL-encoded) in a gateway's log" in report
    assert "sk-pla… (JSON-escaped" not in report and "sk-pla… (as is) in output of" in report
    assert "sk-nev" not in report
    clean = inner_session(tmp_path, "test_clean.py")
    assert clean.returncode == 0, clean.stdout + clean.stderr
