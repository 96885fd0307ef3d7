"""Tests for scripts/fake_provider.py, driven through the official openai SDK."""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import zlib
from pathlib import Path

import openai
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fake_provider.py"


@pytest.fixture(scope="module")
def port():
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", "0"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.fullmatch(r"fake provider listening at 127\.0\.0\.1:(\d+)\n", line)
    assert match, line
    yield int(match.group(1))
    proc.terminate()
    assert proc.wait(timeout=5) == 0
    proc.stdout.close()


def call(port: int, method: str, path: str, body: object = None, auth: bool = True) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Authorization": "Bearer sk-raw"} if auth else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def client(port):
    call(port, "DELETE", "/_fake/requests")
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="sk-test", max_retries=0) as c:
        yield c


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there world"}]
PROMPT_TOKENS = 3 + (3 + 2) + (3 + 3)


def test_non_stream(client):
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert resp.model == "gpt-4o-mini" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.content == "w0 w1 w2"
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == \
        (PROMPT_TOKENS, 3, PROMPT_TOKENS + 3)


def test_stream_without_usage(client):
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w0 w1 w2 w3 w4"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_stream_with_usage_and_behaviour(client, port):
    call(port, "POST", "/_fake/behaviours", [{"cached_tokens": 4, "reasoning_tokens": 7}])
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "w0 w1 w2 w3 w4"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, 5 + 7)
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens_details.reasoning_tokens == 7


def test_rate_limit_behaviour(client, port):
    call(port, "POST", "/_fake/behaviours", [{"status": 429, "headers": {"retry-after": "1"}}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=MESSAGES)


def test_request_log(client, port):
    client.chat.completions.create(model="m", messages=MESSAGES)
    _, body = call(port, "GET", "/_fake/requests")
    [entry] = json.loads(body)
    assert entry["path"] == "/openai/v1/chat/completions" and entry["response_status"] == 200
    assert ["authorization", "Bearer sk-test"] in entry["headers"]
    assert entry["body"]["model"] == "m" and entry["usage"]["completion_tokens"] == 5


def test_errors(port):
    assert call(port, "POST", "/openai/v1/nope", {"model": "m"})[0] == 404
    assert call(port, "POST", "/deepseek/chat/completions", {"messages": []})[0] == 400
    status, body = call(port, "POST", "/xai/v1/chat/completions", {"model": "m"}, auth=False)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_gzip_stream_cut(port):
    call(port, "POST", "/_fake/behaviours", [{"gzip": True, "cut_after": 3}])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/mistral/v1/chat/completions", body=json.dumps({"model": "m", "stream": True}),
                 headers={"Authorization": "Bearer k"})
    resp = conn.getresponse()
    assert resp.headers["content-encoding"] == "gzip"
    decoder = zlib.decompressobj(wbits=31)
    events = []
    with pytest.raises(http.client.IncompleteRead):
        while chunk := resp.read1():
            events.append(decoder.decompress(chunk))
    conn.close()
    text = b"".join(events).decode()
    assert text.count("data: ") == 3 and '"content":" w1"' in text
