"""Tests for scripts/fake_provider.py, driven through the official openai, anthropic and google-genai SDKs."""

from __future__ import annotations

import base64
import http.client
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

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


def call(
    port: int, method: str, path: str, body: object = None, auth: bool = True, headers: dict | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(
            method,
            path,
            body=None if body is None else json.dumps(body),
            headers={**({"Authorization": "Bearer sk-raw"} if auth else {}), **(headers or {})},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def behave(port: int, *behaviours: dict) -> None:
    assert call(port, "POST", "/_fake/behaviours", list(behaviours))[0] == 200


def logged(port: int) -> list[dict]:
    return json.loads(call(port, "GET", "/_fake/requests")[1])


@pytest.fixture
def fresh(port):
    """Start from an empty request log and no pending behaviours."""
    call(port, "DELETE", "/_fake/requests")


@pytest.fixture
def client(port, fresh):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="sk-test", max_retries=0) as c:
        yield c


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there world"}]
PROMPT_TOKENS = 3 + (3 + 2) + (3 + 3)


def test_non_stream(client):
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    assert resp.model == "gpt-4o-mini" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.content == "w0 w1 w2"
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        PROMPT_TOKENS,
        3,
        PROMPT_TOKENS + 3,
    )


def test_stream_without_usage(client):
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w0 w1 w2 w3 w4"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_stream_with_usage_and_behaviour(client, port):
    call(port, "POST", "/_fake/behaviours", [{"cached_tokens": 4, "reasoning_tokens": 7}])
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
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
    conn.request(
        "POST",
        "/mistral/v1/chat/completions",
        body=json.dumps({"model": "m", "stream": True}),
        headers={"Authorization": "Bearer k"},
    )
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


# --- OpenAI: Responses API ---------------------------------------------------------------


def test_responses_non_stream(client, port):
    behave(port, {"cached_tokens": 2, "cache_write_tokens": 1, "reasoning_tokens": 4})
    resp = client.responses.create(model="gpt-4.1", input="hello there world", max_output_tokens=3)
    assert resp.id.startswith("resp_") and resp.status == "completed" and resp.model == "gpt-4.1"
    assert resp.output_text == "w0 w1 w2"
    usage = resp.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (3 + 3, 3 + 4, 6 + 7)
    assert usage.input_tokens_details.cached_tokens == 2 and usage.input_tokens_details.cache_write_tokens == 1
    assert usage.output_tokens_details.reasoning_tokens == 4
    assert logged(port)[0]["usage"]["input_tokens"] == 6


def test_responses_stream_events(client, port):
    events = list(client.responses.create(model="m", input=MESSAGES, stream=True))
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["w0", " w1", " w2", " w3", " w4"]
    assert events[0].response.usage is None
    final = events[-1].response
    assert final.output_text == "w0 w1 w2 w3 w4"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (
        PROMPT_TOKENS,
        5,
        PROMPT_TOKENS + 5,
    )
    status, body = call(port, "POST", "/xai/v1/responses", {"model": "m", "input": "x", "stream": True})
    assert status == 200 and b"[DONE]" not in body and body.endswith(b"\n\n")


def test_responses_stream_helper_with_instructions(client):
    with client.responses.stream(
        model="m", instructions="be brief", input="hello there world", max_output_tokens=2
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "w0 w1"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3 + 3 + 2, 2)


# --- OpenAI: embeddings, legacy completions, speech --------------------------------------


def test_embeddings_base64_by_default(client, port):
    resp = client.embeddings.create(model="text-embedding-3-small", input=["hello there", "world"])
    assert [d.index for d in resp.data] == [0, 1]
    assert resp.data[1].embedding == [(8 + j + 1) / 64 for j in range(8)]
    assert (resp.usage.prompt_tokens, resp.usage.total_tokens) == (2 + 1 + 1 + 1, 5)
    [entry] = logged(port)
    assert entry["body"]["encoding_format"] == "base64"  # what the SDK sends unless told otherwise
    _, raw = call(port, "POST", "/openai/v1/embeddings", {"model": "e", "input": "a", "encoding_format": "base64"})
    vector = json.loads(raw)["data"][0]["embedding"]
    assert struct.unpack("<8f", base64.b64decode(vector)) == tuple((j + 1) / 64 for j in range(8))


def test_embeddings_float(client):
    resp = client.embeddings.create(model="e", input="one two three", encoding_format="float", dimensions=3)
    assert resp.data[0].embedding == [1 / 64, 2 / 64, 3 / 64]
    assert resp.usage.prompt_tokens == 3 + 1


def test_completions_non_stream(client, port):
    behave(port, {"cached_tokens": 1})
    resp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hello", max_tokens=3)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].text == "w0 w1 w2" and resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (2 + 3, 3, 8)
    assert resp.usage.prompt_tokens_details.cached_tokens == 1


def test_completions_stream(client):
    chunks = list(
        client.completions.create(model="m", prompt="say hello", stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "w0 w1 w2 w3 w4"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 5)
    plain = list(client.completions.create(model="m", prompt="x", stream=True))
    assert all(c.usage is None for c in plain) and len(plain) == 6


def test_speech(client, port):
    resp = client.audio.speech.create(model="tts-1", input="hello world", voice="alloy")
    assert resp.response.headers["content-type"] == "audio/mpeg"
    assert len(resp.content) == 100 * len("hello world") and resp.content[:2] == b"\xff\xfb"
    assert len(client.audio.speech.create(model="tts-1", input="", voice="alloy").content) == 100
    assert [e["usage"] for e in logged(port)] == [None, None]


@pytest.mark.usefixtures("fresh")
def test_deepseek_usage(port):
    behave(port, {"cached_tokens": 4}, {"cached_tokens": 4})
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/deepseek", api_key="sk-test", max_retries=0) as c:
        usage = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES).usage
        chunks = list(
            c.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
    for u in (usage, chunks[-1].usage):
        assert (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens) == (PROMPT_TOKENS, 5, 4)
        assert (u.model_extra["prompt_cache_hit_tokens"], u.model_extra["prompt_cache_miss_tokens"]) == (
            4,
            PROMPT_TOKENS - 4,
        )


@pytest.mark.usefixtures("fresh")
@pytest.mark.parametrize("provider, model", [("deepseek", "deepseek-reasoner"), ("xai", "grok-3-mini")])
def test_deepseek_and_xai_show_their_reasoning_before_the_answer(port, provider, model):
    behave(port, {"reasoning_tokens": 3}, {"reasoning_tokens": 3}, {})
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/{provider}", api_key="sk-test", max_retries=0) as c:
        message = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).choices[0].message
        deltas = [
            chunk.choices[0].delta
            for chunk in c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, stream=True)
        ]
        plain = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("r0 r1 r2", "w0 w1")
    shown = [(d.model_extra.get("reasoning_content"), d.content) for d in deltas]
    assert shown == [(None, ""), ("r0", None), (" r1", None), (" r2", None), (None, "w0"), (None, " w1"), (None, None)]
    assert "reasoning_content" not in plain.model_extra  # no reasoning tokens, none shown


@pytest.mark.usefixtures("fresh")
def test_xai_counts_its_reasoning_apart_from_the_completion_tokens(port):
    behave(port, {"reasoning_tokens": 3})
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/xai", api_key="sk-test", max_retries=0) as c:
        usage = c.chat.completions.create(model="grok-3-mini", messages=MESSAGES, max_tokens=2).usage
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (2, 3)
    assert usage.total_tokens == PROMPT_TOKENS + 2 + 3


@pytest.mark.usefixtures("fresh")
def test_mistral_streams_usage_unasked_in_the_last_chunk_and_refuses_stream_options(port):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/mistral/v1", api_key="sk-test", max_retries=0) as c:
        chunks = list(c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, stream=True))
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            c.chat.completions.create(model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    last = chunks[-1]
    assert (last.choices[0].finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens) == (
        "stop",
        PROMPT_TOKENS,
        2,
    )
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert refused.value.body["message"]["detail"][0]["type"] == "extra_forbidden"


def test_openai_keeps_its_reasoning_to_itself(client, port):
    behave(port, {"reasoning_tokens": 3})
    message = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message
    assert "reasoning_content" not in message.model_extra


def test_endpoint_availability(port):
    body = {"model": "m", "input": "x", "prompt": "x", "messages": []}
    assert call(port, "POST", "/mistral/v1/embeddings", body)[0] == 200
    assert call(port, "POST", "/mistral/v1/responses", body)[0] == 404
    assert call(port, "POST", "/deepseek/beta/completions", body)[0] == 200
    assert call(port, "POST", "/deepseek/v1/embeddings", body)[0] == 404
    assert call(port, "POST", "/xai/v1/completions", body)[0] == 200
    assert call(port, "POST", "/openai/v1/embeddings", {"model": "m"})[0] == 400


# --- Anthropic messages -----------------------------------------------------------------


@pytest.fixture
def claude(port, fresh):
    with anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}/anthropic", api_key="sk-ant-test", max_retries=0) as c:
        yield c


CLAUDE_MESSAGES = [{"role": "user", "content": "hello there world"}]
CLAUDE_PROMPT = 3 + (3 + 3) + 2  # messages + the words of system="be brief"


def test_anthropic_non_stream(claude, port):
    behave(port, {"cached_tokens": 3, "cache_write_tokens": 2})
    msg = claude.messages.create(model="claude-test", max_tokens=3, system="be brief", messages=CLAUDE_MESSAGES)
    assert msg.id.startswith("msg_") and msg.model == "claude-test" and msg.stop_reason == "end_turn"
    assert [b.text for b in msg.content] == ["w0 w1 w2"]
    usage = msg.usage
    assert (
        usage.input_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
        usage.output_tokens,
    ) == (CLAUDE_PROMPT - 3 - 2, 3, 2, 3)
    [entry] = logged(port)
    assert entry["usage"]["input_tokens"] == CLAUDE_PROMPT - 5
    assert ["anthropic-version", anthropic._constants.ANTHROPIC_API_VERSION] in entry["headers"]


def test_anthropic_stream(claude, port):
    behave(port, {"cached_tokens": 100})  # more than the prompt: input_tokens clamps to 0
    events = list(
        claude.messages.create(
            model="c",
            max_tokens=4,
            messages=CLAUDE_MESSAGES,
            system=[{"type": "text", "text": "be brief"}],
            stream=True,
        )
    )
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # ping is skipped
    assert [e.delta.text for e in events if e.type == "content_block_delta"] == ["w0", " w1", " w2", " w3"]
    start, delta = events[0].message.usage, events[-2].usage
    assert (start.input_tokens, start.cache_read_input_tokens, start.output_tokens) == (0, 100, 1)
    assert delta.output_tokens == 4 and events[-2].delta.stop_reason == "end_turn"
    with claude.messages.stream(model="c", max_tokens=2, messages=CLAUDE_MESSAGES) as stream:
        assert stream.get_final_text() == "w0 w1"
        final = stream.get_final_message().usage
    assert (final.input_tokens, final.output_tokens) == (CLAUDE_PROMPT - 2, 2)


def test_a_stream_paused_after_some_events_goes_on_when_released(client, port):
    behave(port, {"pause_after": 2, "words": 4})
    with client.chat.completions.with_streaming_response.create(model="m", messages=MESSAGES, stream=True) as response:
        chunks = response.parse()
        first = [next(chunks), next(chunks)]
        assert logged(port)[0]["events_sent"] == 2  # and no more until released
        assert call(port, "POST", "/_fake/release")[0] == 200
        rest = list(chunks)
    contents = [chunk.choices[0].delta.content for chunk in first + rest if chunk.choices]
    assert "".join(content or "" for content in contents) == "w0 w1 w2 w3"


@pytest.mark.usefixtures("fresh")
def test_anthropic_stream_with_the_documented_minimal_message_delta(claude, port):
    """`minimal_delta`: the `message_delta` has only `output_tokens`, as Anthropic documents it;
    the input and cache figures come once, in `message_start`."""
    behave(port, {"minimal_delta": True, "cached_tokens": 3, "cache_write_tokens": 2})
    events = list(claude.messages.create(model="c", max_tokens=4, messages=CLAUDE_MESSAGES, stream=True))
    start, delta = events[0].message.usage, events[-2]
    prompt = 3 + (3 + 3)  # no system prompt
    assert (start.input_tokens, start.cache_read_input_tokens, start.cache_creation_input_tokens) == (prompt - 5, 3, 2)
    assert delta.type == "message_delta" and delta.usage.model_dump(exclude_none=True) == {"output_tokens": 4}
    assert logged(port)[0]["usage"]["output_tokens"] == 4


@pytest.mark.usefixtures("fresh")
def test_anthropic_stream_raw_and_usage_false(port):
    behave(port, {"usage": False})
    headers = {"x-api-key": "sk-ant", "anthropic-version": "2023-06-01"}
    status, body = call(
        port,
        "POST",
        "/anthropic/v1/messages",
        {"model": "c", "max_tokens": 1, "stream": True, "messages": CLAUDE_MESSAGES},
        False,
        headers,
    )
    assert status == 200 and b'event: ping\ndata: {"type": "ping"}\n\n' in body and b'"usage"' not in body
    assert body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert logged(port)[0]["usage"] is None


def test_anthropic_errors(claude, port):
    body = {"model": "c", "max_tokens": 1, "messages": CLAUDE_MESSAGES}
    status, raw = call(port, "POST", "/anthropic/v1/messages", body, False, {"anthropic-version": "2023-06-01"})
    assert status == 401 and json.loads(raw) == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    status, raw = call(port, "POST", "/anthropic/v1/messages", body, False, {"x-api-key": "k"})
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    behave(port, {"status": 529}, {"status": 429, "headers": {"retry-after": "3"}})
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        claude.messages.create(**body)
    assert overloaded.value.status_code == 529 and overloaded.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude.messages.create(**body)
    assert limited.value.response.headers["retry-after"] == "3"
    status, raw = call(
        port,
        "POST",
        "/anthropic/v1/messages",
        {"model": "c", "messages": CLAUDE_MESSAGES},
        False,
        {"x-api-key": "k", "anthropic-version": "2023-06-01"},
    )
    assert status == 400 and json.loads(raw)["error"]["message"] == "max_tokens: Field required"


# --- Google Gemini ----------------------------------------------------------------------


@pytest.fixture
def gemini(port, fresh):
    client = genai.Client(
        api_key="AIza-test",
        http_options=genai_types.HttpOptions(base_url=f"http://127.0.0.1:{port}/google", api_version="v1beta"),
    )
    yield client
    client.close()


GEMINI_CONFIG = genai_types.GenerateContentConfig(system_instruction="be brief", max_output_tokens=3)
GEMINI_PROMPT = 3 + (3 + 3) + 2  # one content + the words of the system instruction


@pytest.mark.usefixtures("fresh")
def test_gemini_non_stream_default_api_version(port):
    behave(port, {"cached_tokens": 4, "reasoning_tokens": 6})
    client = genai.Client(api_key="AIza-test", http_options={"base_url": f"http://127.0.0.1:{port}/google"})
    resp = client.models.generate_content(model="gemini-2.0-flash", contents="hello there world", config=GEMINI_CONFIG)
    client.close()
    assert resp.text == "w0 w1 w2" and resp.candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert resp.model_version == "gemini-2.0-flash" and resp.response_id
    u = resp.usage_metadata
    assert (
        u.prompt_token_count,
        u.candidates_token_count,
        u.thoughts_token_count,
        u.cached_content_token_count,
        u.total_token_count,
    ) == (GEMINI_PROMPT, 3, 6, 4, GEMINI_PROMPT + 3 + 6)
    [entry] = logged(port)
    # google-genai without api_version calls /v1, sends the key as a header and a camelCase body
    assert entry["path"] == "/google/v1/models/gemini-2.0-flash:generateContent" and entry["query"] == ""
    assert ["x-goog-api-key", "AIza-test"] in entry["headers"]
    assert entry["body"]["systemInstruction"] == {"parts": [{"text": "be brief"}], "role": "user"}
    assert entry["body"]["generationConfig"] == {"maxOutputTokens": 3}


def test_gemini_stream_sse(gemini, port):
    chunks = list(
        gemini.models.generate_content_stream(
            model="gemini-2.5-flash", contents="hello there world", config=GEMINI_CONFIG
        )
    )
    assert [c.text for c in chunks] == ["w0", " w1", " w2"]
    assert [c.usage_metadata.candidates_token_count for c in chunks] == [1, 2, 3]
    assert {c.usage_metadata.prompt_token_count for c in chunks} == {GEMINI_PROMPT}
    assert chunks[-1].usage_metadata.total_token_count == GEMINI_PROMPT + 3
    assert [c.candidates[0].finish_reason for c in chunks] == [None, None, genai_types.FinishReason.STOP]
    [entry] = logged(port)
    assert entry["path"] == "/google/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert entry["query"] == "alt=sse" and entry["usage"]["candidatesTokenCount"] == 3


def test_gemini_raw_formats(port):
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 2}}
    path = "/google/v1beta/models/g:streamGenerateContent"
    status, raw = call(port, "POST", path + "?alt=sse&key=k", body, False)
    assert status == 200 and raw.count(b"\r\n\r\n") == 2 and raw.startswith(b"data: {")
    status, raw = call(port, "POST", path + "?key=k", body, False)
    array = json.loads(raw)
    assert status == 200 and [c["candidates"][0]["content"]["parts"][0]["text"] for c in array] == ["w0", " w1"]
    assert array[-1]["usageMetadata"]["totalTokenCount"] == 3 + 4 + 2
    status, raw = call(port, "POST", "/google/v1beta/models/g:generateContent", body, False)
    assert status == 403 and json.loads(raw)["error"]["status"] == "PERMISSION_DENIED"
    assert call(port, "POST", "/google/v1beta/models/g:nope?key=k", body, False)[0] == 404
    assert call(port, "POST", "/google/v1beta/models/g:generateContent?key=k", {}, False)[0] == 400


def test_gemini_injected_error_and_usage_false(gemini, port):
    behave(port, {"status": 429}, {"usage": False})
    with pytest.raises(genai_errors.ClientError) as exc:
        gemini.models.generate_content(model="g", contents="hi")
    assert exc.value.code == 429 and exc.value.status == "RESOURCE_EXHAUSTED"
    resp = gemini.models.generate_content(model="g", contents="hi")
    assert resp.text == "w0 w1 w2 w3 w4" and resp.usage_metadata is None
