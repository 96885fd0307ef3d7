#!/usr/bin/env python3
"""Fake AI-provider upstream for meterproxy integration tests and benchmarks.

A single-process asyncio + h11 HTTP/1.1 server (keep-alive, no threads) that
speaks the real wire formats the official ``openai``, ``anthropic`` and
``google-genai`` SDKs parse.  The first path segment names the emulated
provider (an entry of ``FORMATS``); every endpoint below is also served
without its ``/v1`` where the OpenAI-compatible column says so:

* ``/openai``   chat/completions, responses, embeddings, completions, audio/speech
* ``/mistral``  chat/completions, embeddings
* ``/deepseek`` chat/completions, completions (also ``/beta/completions``);
  usage adds ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``
* ``/xai``      chat/completions, responses, completions
  (all of the above: ``POST <prefix>[/v1]/<endpoint>``, ``Authorization: Bearer``)
* ``/anthropic`` ``POST /v1/messages`` and ``/v1/messages/count_tokens``
  (``x-api-key`` or Bearer, plus ``anthropic-version``)
* ``/google``   ``POST /v1beta/models/<model>:generateContent`` and
  ``:streamGenerateContent`` (``?alt=sse`` for SSE, else a JSON array), and
  ``:countTokens`` (``totalTokens``, the prompt P below); ``/v1``
  and ``/v1alpha`` work too (google-genai uses ``/v1`` by default).  Auth:
  ``x-goog-api-key`` header or ``?key=``.

Deterministic output (words and token counts):

* n_out = behaviour ``words``, else the request's limit (chat: ``max_tokens``,
  then ``max_completion_tokens``; completions/anthropic: ``max_tokens``;
  responses: ``max_output_tokens``; google: ``generationConfig.maxOutputTokens``),
  else 5.  Word i is ``f"w{i}"`` (right-padded with "x" to ``word_bytes`` bytes if
  that behaviour is set); text = words joined by single spaces, so streamed
  piece i is ``"w0"`` for i == 0, else ``" w{i}"`` (one stream event per word).
* words(x) = whitespace-separated words of a string, or of every part's
  ``text`` when x is a list of parts/blocks.
* chat formula over a message list = 3 + sum over messages of
  (3 + words(content)).
* K = behaviour ``cached_tokens``, W = ``cache_write_tokens``,
  R = ``reasoning_tokens`` (all default 0).  DeepSeek and xAI chat completions
  show their reasoning: R pieces ``"r0"``, ``" r1"``, ... in
  ``delta.reasoning_content`` before the text (one stream event each), or
  ``message.reasoning_content`` = ``"r0 r1 ..."``.

Per format (P = prompt tokens, C = n_out + R):

* chat: P = chat formula over ``messages``; usage prompt_tokens P,
  completion_tokens C, total P + C, cached_tokens K, reasoning_tokens R.
  xAI: completion_tokens n_out (its reasoning is apart), total P + C.
  Mistral: a stream's usage comes unasked in its last text chunk (the one
  with finish_reason), and ``stream_options`` is refused with a 422.
  DeepSeek: usage is DeepSeek's (prompt_tokens_details.cached_tokens K,
  prompt_cache_hit_tokens K, prompt_cache_miss_tokens max(P - K, 0)).
* completions: P = words(``prompt``, a string or list of strings) + 3; usage as chat.
* responses: P = words(``input``) + 3 for a string ``input``, the chat formula
  for a list; plus words(``instructions``).  usage input_tokens P (cached_tokens
  K, cache_write_tokens W), output_tokens C (reasoning_tokens R), total P + C.
* embeddings: P = sum over inputs (a string, list of strings or token arrays)
  of (words, or token-array length) + 1 per input; usage prompt_tokens =
  total_tokens = P.  8 floats per input (``dimensions`` overrides), as base64
  little-endian float32 when ``encoding_format`` is ``"base64"``.
* audio/speech: ``audio/mpeg`` (or per ``response_format``), max(100, 100 *
  len(input)) bytes, streamed in 1000-byte chunks; no usage.
* anthropic: P = chat formula over ``messages`` + words(``system``);
  input_tokens = max(P - K - W, 0), cache_read_input_tokens K,
  cache_creation_input_tokens W (of which behaviour ``cache_write_1h_tokens``
  in ``cache_creation.ephemeral_1h_input_tokens``, the rest 5m), output_tokens C.
* google: P = 3 + sum over ``contents`` of (3 + words(parts)) +
  words(``systemInstruction.parts``); usageMetadata promptTokenCount P,
  candidatesTokenCount n_out, thoughtsTokenCount R (if > 0),
  cachedContentTokenCount K (if > 0, a subset of P), totalTokenCount
  P + n_out + R.  Every streamed chunk carries the cumulative usageMetadata.

Control endpoints (never forwarded by the gateway; they do not consume
behaviours and are not logged):

* ``POST /_fake/behaviours`` – JSON list of objects, each applied FIFO to one
  following request: status/body/headers (the default error body has the
  provider's error shape), cached_tokens, cache_write_tokens,
  cache_write_1h_tokens, reasoning_tokens, usage (false = omit the usage objects), chunk_delay,
  first_byte_delay, cut_after (close the connection after that many stream
  events, without the terminating chunk), body_cut (send only that many bytes
  of a body that is not streamed, wait body_stall seconds, then close), hang,
  words, word_bytes, gzip, minimal_delta (an Anthropic stream's ``message_delta``
  usage has only ``output_tokens``, as Anthropic documents it; by default it
  repeats every figure), pause_after (a stream waits after that many events
  until ``POST /_fake/release``, a minute at most: a test sees what arrived
  while the provider had sent only part of it).
* ``GET /_fake/requests`` – log of every other request seen (response_status is
  null if nothing was answered, e.g. ``hang``; usage is the usage object the
  fake reported, in the provider's own shape).
* ``DELETE /_fake/requests`` – clear the log and pending behaviours (and release
  the paused streams).
* ``POST /_fake/release`` – let the streams paused by ``pause_after`` go on.

Usage: ``fake_provider.py [--host 127.0.0.1] [--port 0]`` prints
``fake provider listening at HOST:PORT`` and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import itertools
import json
import re
import signal
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs

import h11

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_NOT_JSON = object()
_NO_BEHAVIOUR: dict = {}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"transfer-encoding", b"chunked")]


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    events: Iterable[bytes] | None = None  # streamed body: chunked encoding, one HTTP chunk per item


class FakeState:
    """Pending behaviours, request log and id counter shared by all connections."""

    def __init__(self) -> None:
        self.behaviours: deque[dict] = deque()
        self.requests: list[dict] = []
        self.ids = itertools.count(1)
        self.released = asyncio.Event()  # the streams paused so far (`pause_after`) wait for it

    def release(self) -> None:
        """Let the paused streams go on; the next ones wait for the next release."""
        self.released.set()
        self.released = asyncio.Event()

    def reset(self) -> None:
        self.behaviours.clear()
        self.requests.clear()
        self.release()


def _json_reply(status: int, value: object, headers: list | None = None) -> Reply:
    return Reply(status, headers or JSON, _dumps(value).encode())


def _openai_error_body(status: int, message: str, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": None,
            "code": code,
        }
    }


def _error(status: int, message: str, code: str | None = None) -> Reply:
    return _json_reply(status, _openai_error_body(status, message, code))


_OK = _json_reply(200, {"ok": True})
_UNAUTHORIZED = _error(
    401,
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    "invalid_api_key",
)


def _not_found(method: str, path: str) -> Reply:
    return _error(404, f"Invalid URL ({method} {path})")


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return _NOT_JSON


def _header(entry: dict, name: str) -> str | None:
    for key, value in entry["headers"]:
        if key == name:
            return value
    return None


def _has_bearer(headers: list[list[str]]) -> bool:
    for name, value in headers:
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            return scheme.lower() == "bearer" and bool(token.strip())
    return False


# --- shared helpers: words, token counts, stream events ---------------------------------


def _words(value: object) -> int:
    """Whitespace words of a string, or of every part's ``text`` in a list of parts/blocks."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(len(p["text"].split()) for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _prompt_tokens(messages: object) -> int:
    """The chat formula: 3 + sum over messages of (3 + words of the content)."""
    total = 3
    for message in messages if isinstance(messages, list) else ():
        total += 3 + _words(message.get("content") if isinstance(message, dict) else None)
    return total


def _n_out(behaviour: dict, *limits: object) -> int:
    for n in (behaviour.get("words"), *limits):
        if isinstance(n, int):
            return n
    return 5


def _word(i: int, width: int) -> str:
    return f"w{i}".ljust(width, "x")


def _piece(i: int, width: int) -> str:
    """The i-th streamed piece of the text: ``"w0"``, ``" w1"``, ..."""
    return " " + _word(i, width) if i else _word(i, width)


def _text(n_out: int, width: int) -> str:
    return " ".join(_word(i, width) for i in range(n_out))


def _data_event(value: object) -> bytes:
    return b"data: %s\n\n" % _dumps(value).encode()


def _named_event(type_: str, **fields: object) -> bytes:
    """``event: <type>`` + ``data: {"type": <type>, **fields}`` (Anthropic and OpenAI Responses)."""
    return b"event: %s\ndata: %s\n\n" % (type_.encode(), _dumps({"type": type_, **fields}).encode())


def _chunked(content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"transfer-encoding", b"chunked")]


# --- OpenAI-compatible: chat completions ------------------------------------------------

UsageFn = Callable[[int, int, dict], dict]


def _usage(prompt: int, n_out: int, behaviour: dict, reasoning_apart: bool = False) -> dict:
    """`reasoning_apart`: xAI's convention, reasoning tokens outside ``completion_tokens`` but
    in ``total_tokens``; OpenAI's counts them in both."""
    reasoning = behaviour.get("reasoning_tokens", 0)
    completion = n_out if reasoning_apart else n_out + reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + n_out + reasoning,
        "prompt_tokens_details": {"cached_tokens": behaviour.get("cached_tokens", 0), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _deepseek_usage(prompt: int, n_out: int, behaviour: dict) -> dict:
    reasoning, cached = behaviour.get("reasoning_tokens", 0), behaviour.get("cached_tokens", 0)
    completion = n_out + reasoning
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": max(prompt - cached, 0),
    }
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _thought(i: int) -> str:
    """The i-th piece of reasoning shown before the text: ``"r0"``, ``" r1"``, ..."""
    return f" r{i}" if i else "r0"


def _chat_chunks(
    rid: str,
    created: int,
    model: str,
    n_out: int,
    width: int,
    usage: dict | None,
    shown_reasoning: int,
    usage_in_last: bool = False,
) -> Iterator[bytes]:
    """SSE events of a streamed completion; usage is None unless the usage chunk is wanted.
    `usage_in_last`: Mistral's way, usage in the last chunk of the text, sent unasked."""
    head = (
        'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"service_tier":"default",'
        '"system_fingerprint":"fp_fake","choices":' % (rid, created, _dumps(model))
    )
    tail = "}\n\n" if usage is None or usage_in_last else ',"usage":null}\n\n'

    def event(delta: str, finish: str = "null", end: str = tail) -> bytes:
        return f'{head}[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{end}'.encode()

    yield event('{"role":"assistant","content":"","refusal":null}')
    for i in range(shown_reasoning):
        yield event('{"content":null,"reasoning_content":"%s"}' % _thought(i))
    for i in range(n_out):
        yield event('{"content":"%s%s"}' % (" " if i else "", _word(i, width)))
    usage_end = f',"usage":{_dumps(usage)}}}\n\n'
    if usage is not None and usage_in_last:
        yield event("{}", '"stop"', usage_end)
    else:
        yield event("{}", '"stop"')
        if usage is not None:
            yield f"{head}[]{usage_end}".encode()
    yield b"data: [DONE]\n\n"


def _extra_forbidden(field: str) -> Reply:
    """Mistral's answer to a field it does not know (its request models forbid extras)."""
    detail = {"type": "extra_forbidden", "loc": ["body", field], "msg": "Extra inputs are not permitted"}
    body = {"object": "error", "message": {"detail": [detail]}, "type": "invalid_request_error", "param": None}
    return _json_reply(422, {**body, "code": None})


def _wants_stream_usage(req: dict) -> bool:
    options = req.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _chat_completion(
    state: FakeState,
    entry: dict,
    behaviour: dict,
    req: dict,
    usage_of: UsageFn,
    shows_reasoning: bool = False,
    usage_unasked: bool = False,
) -> Reply:
    """`shows_reasoning`: the reasoning tokens come as text too (DeepSeek's and xAI's
    ``reasoning_content``), before the answer. `usage_unasked`: Mistral's way, a stream's usage
    comes unasked, in its last chunk, and ``stream_options`` is refused (422)."""
    if usage_unasked and "stream_options" in req:
        return _extra_forbidden("stream_options")
    n_out = _n_out(behaviour, req.get("max_tokens"), req.get("max_completion_tokens"))
    shown_reasoning = behaviour.get("reasoning_tokens", 0) if shows_reasoning else 0
    width = behaviour.get("word_bytes", 0)
    usage = usage_of(_prompt_tokens(req.get("messages")), n_out, behaviour) if behaviour.get("usage", True) else None
    rid, created, model = "chatcmpl-fake%020d" % next(state.ids), int(time.time()), req["model"]
    if req.get("stream") is True:
        if not (usage_unasked or _wants_stream_usage(req)):
            usage = None
        entry["usage"] = usage
        events = _chat_chunks(rid, created, model, n_out, width, usage, shown_reasoning, usage_unasked)
        return Reply(200, SSE, events=events)
    entry["usage"] = usage
    text = " ".join(_word(i, width) for i in range(n_out))
    message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if shown_reasoning:
        message["reasoning_content"] = "".join(_thought(i) for i in range(shown_reasoning))
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        **({"usage": usage} if usage is not None else {}),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    return _json_reply(200, body)


# --- OpenAI-compatible: legacy completions ----------------------------------------------


def _completion_chunks(head: dict, n_out: int, width: int, usage: dict | None) -> Iterator[bytes]:
    extra = {} if usage is None else {"usage": None}

    def event(text: str, finish: str | None = None) -> bytes:
        return _data_event(
            {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}], **extra}
        )

    for i in range(n_out):
        yield event(_piece(i, width))
    yield event("", "stop")
    if usage is not None:
        yield _data_event({**head, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


def _completion(state: FakeState, entry: dict, behaviour: dict, req: dict, usage_of: UsageFn) -> Reply:
    prompt = req.get("prompt")
    if not isinstance(prompt, (str, list)):
        return _error(400, "you must provide a prompt parameter")
    n_out, width = _n_out(behaviour, req.get("max_tokens")), behaviour.get("word_bytes", 0)
    words = _words(prompt) if isinstance(prompt, str) else sum(_words(p) for p in prompt)
    usage = usage_of(words + 3, n_out, behaviour) if behaviour.get("usage", True) else None
    head = {
        "id": "cmpl-fake%020d" % next(state.ids),
        "object": "text_completion",
        "created": int(time.time()),
        "model": req["model"],
        "system_fingerprint": "fp_fake",
    }
    if req.get("stream") is True:
        if not _wants_stream_usage(req):
            usage = None
        entry["usage"] = usage
        return Reply(200, SSE, events=_completion_chunks(head, n_out, width, usage))
    entry["usage"] = usage
    body = {**head, "choices": [{"text": _text(n_out, width), "index": 0, "logprobs": None, "finish_reason": "stop"}]}
    if usage is not None:
        body["usage"] = usage
    return _json_reply(200, body)


# --- OpenAI: Responses API --------------------------------------------------------------


def _responses_usage(prompt: int, n_out: int, behaviour: dict) -> dict:
    reasoning = behaviour.get("reasoning_tokens", 0)
    output = n_out + reasoning
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": behaviour.get("cached_tokens", 0),
            "cache_write_tokens": behaviour.get("cache_write_tokens", 0),
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


def _responses_events(response: dict, n_out: int, width: int) -> Iterator[bytes]:
    seq = itertools.count()

    def event(type_: str, **fields: object) -> bytes:
        return _named_event(type_, sequence_number=next(seq), **fields)

    pending = {**response, "status": "in_progress", "completed_at": None, "output": [], "usage": None}
    message = response["output"][0]
    part = message["content"][0]
    where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    yield event("response.output_item.added", output_index=0, item={**message, "status": "in_progress", "content": []})
    yield event("response.content_part.added", **where, part={**part, "text": ""})
    for i in range(n_out):
        yield event("response.output_text.delta", **where, delta=_piece(i, width), logprobs=[])
    yield event("response.output_text.done", **where, text=part["text"], logprobs=[])
    yield event("response.content_part.done", **where, part=part)
    yield event("response.output_item.done", output_index=0, item=message)
    yield event("response.completed", response=response)


def _responses(state: FakeState, entry: dict, behaviour: dict, req: dict, usage_of: UsageFn) -> Reply:
    n_out, width = _n_out(behaviour, req.get("max_output_tokens")), behaviour.get("word_bytes", 0)
    given = req.get("input")
    prompt = (_words(given) + 3 if isinstance(given, str) else _prompt_tokens(given)) + _words(req.get("instructions"))
    usage = _responses_usage(prompt, n_out, behaviour) if behaviour.get("usage", True) else None
    entry["usage"] = usage
    n, created = next(state.ids), int(time.time())
    message = {
        "id": "msg_fake%020d" % n,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": _text(n_out, width)}],
    }
    response = {
        "id": "resp_fake%020d" % n,
        "object": "response",
        "created_at": created,
        "status": "completed",
        "background": False,
        "completed_at": created,
        "error": None,
        "incomplete_details": None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": req["model"],
        "output": [message],
        "parallel_tool_calls": True,
        "previous_response_id": req.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": req.get("store", True),
        "temperature": req.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": req.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": req.get("metadata") or {},
    }
    if req.get("stream") is True:
        return Reply(200, SSE, events=_responses_events(response, n_out, width))
    return _json_reply(200, response)


# --- OpenAI-compatible: embeddings and audio speech -------------------------------------


def _embedding(index: int, dims: int, as_base64: bool) -> list[float] | str:
    vector = [(index * dims + j + 1) / 64 for j in range(dims)]  # exact in float32 for small indices
    return base64.b64encode(struct.pack("<%df" % dims, *vector)).decode("ascii") if as_base64 else vector


def _embeddings(state: FakeState, entry: dict, behaviour: dict, req: dict, usage_of: UsageFn) -> Reply:
    inputs = req.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]  # one string or one token array
    if not (isinstance(inputs, list) and inputs and all(isinstance(x, (str, list)) for x in inputs)):
        return _error(400, "'input' must be a non-empty string, list of strings or list of token arrays")
    tokens = sum(_words(x) if isinstance(x, str) else len(x) for x in inputs) + len(inputs)
    dims = req.get("dimensions") if isinstance(req.get("dimensions"), int) and req["dimensions"] > 0 else 8
    as_base64 = req.get("encoding_format") == "base64"
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _embedding(i, dims, as_base64)} for i in range(len(inputs))
        ],
        "model": req["model"],
    }
    entry["usage"] = usage = {"prompt_tokens": tokens, "total_tokens": tokens} if behaviour.get("usage", True) else None
    if usage is not None:
        body["usage"] = usage
    return _json_reply(200, body)


_AUDIO_TYPES = {
    "mp3": b"audio/mpeg",
    "opus": b"audio/ogg",
    "aac": b"audio/aac",
    "flac": b"audio/flac",
    "wav": b"audio/wav",
    "pcm": b"audio/pcm",
}
_AUDIO_FRAME = b"\xff\xfb\x90\x44" + bytes(range(252))  # an MPEG frame header, then filler


def _audio_chunks(size: int, chunk: int = 1000) -> Iterator[bytes]:
    audio = (_AUDIO_FRAME * (size // len(_AUDIO_FRAME) + 1))[:size]
    for start in range(0, size, chunk):
        yield audio[start : start + chunk]


def _speech(state: FakeState, entry: dict, behaviour: dict, req: dict, usage_of: UsageFn) -> Reply:
    text = req.get("input")
    if not isinstance(text, str):
        return _error(400, "you must provide an input parameter")
    content_type = _AUDIO_TYPES.get(req.get("response_format", "mp3"), b"audio/mpeg")
    return Reply(200, _chunked(content_type), events=_audio_chunks(max(100, 100 * len(text))))


# --- OpenAI-compatible formats ----------------------------------------------------------

Endpoint = Callable[[FakeState, dict, dict, dict, UsageFn], Reply]
Handler = Callable[[FakeState, dict, dict, str], Reply]
OPENAI_ENDPOINTS: dict[str, Endpoint] = {
    "/chat/completions": _chat_completion,
    "/completions": _completion,
    "/responses": _responses,
    "/embeddings": _embeddings,
    "/audio/speech": _speech,
}


def openai_compatible(
    endpoints: Iterable[str],
    usage_of: UsageFn = _usage,
    aliases: dict[str, str] | None = None,
    shows_reasoning: bool = False,
    usage_unasked: bool = False,
) -> Handler:
    """OpenAI wire format for the named endpoints, each served at ``/v1<endpoint>`` and ``<endpoint>``;
    `shows_reasoning` and `usage_unasked`: how chat completions differ (see `_chat_completion`)."""
    chat = functools.partial(_chat_completion, shows_reasoning=shows_reasoning, usage_unasked=usage_unasked)
    served = {**OPENAI_ENDPOINTS, "/chat/completions": chat}
    routes = {path: served[name] for name in endpoints for path in ("/v1" + name, name)}
    routes.update({path: served[name] for path, name in (aliases or {}).items()})

    def handler(state: FakeState, entry: dict, behaviour: dict, subpath: str) -> Reply:
        endpoint = routes.get(subpath) if entry["method"] == "POST" else None
        if endpoint is None:
            return _not_found(entry["method"], entry["path"])
        if not _has_bearer(entry["headers"]):
            return _UNAUTHORIZED
        req = entry["body"]
        if not isinstance(req, dict):
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(req.get("model"), str):
            return _error(400, "you must provide a model parameter")
        return endpoint(state, entry, behaviour, req, usage_of)

    return handler


# --- Anthropic messages -----------------------------------------------------------------

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _anthropic_error(status: int, message: str) -> Reply:
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return _json_reply(status, {"type": "error", "error": {"type": kind, "message": message}})


def _anthropic_usage(prompt: int, output: int, behaviour: dict) -> dict:
    read, write = behaviour.get("cached_tokens", 0), behaviour.get("cache_write_tokens", 0)
    hour = min(behaviour.get("cache_write_1h_tokens", 0), write)
    return {
        "input_tokens": max(prompt - read - write, 0),
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write - hour, "ephemeral_1h_input_tokens": hour},
        "output_tokens": output,
        "service_tier": "standard",
    }


def _anthropic_events(message: dict, n_out: int, width: int, minimal_delta: bool = False) -> Iterator[bytes]:
    """`minimal_delta`: the `message_delta` carries only `output_tokens`, as Anthropic documents
    it (the input and cache figures are those of `message_start`)."""
    usage = message.get("usage")
    start = {**message, "content": [], "stop_reason": None}
    if usage is not None:
        start["usage"] = {**usage, "output_tokens": 1}
    yield _named_event("message_start", message=start)
    yield _named_event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    yield b'event: ping\ndata: {"type": "ping"}\n\n'
    for i in range(n_out):
        yield _named_event("content_block_delta", index=0, delta={"type": "text_delta", "text": _piece(i, width)})
    yield _named_event("content_block_stop", index=0)
    final = (
        {}
        if usage is None
        else {
            "usage": {
                key: usage[key]
                for key in (
                    ("output_tokens",)
                    if minimal_delta
                    else ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
                )
            }
        }
    )
    yield _named_event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, **final)
    yield _named_event("message_stop")


def anthropic_messages(state: FakeState, entry: dict, behaviour: dict, subpath: str) -> Reply:
    """Anthropic Messages API: ``POST /v1/messages``, and ``/v1/messages/count_tokens``."""
    if entry["method"] != "POST" or subpath not in ("/v1/messages", "/v1/messages/count_tokens"):
        return _anthropic_error(404, "Not Found")
    if not (_header(entry, "x-api-key") or _has_bearer(entry["headers"])):
        return _anthropic_error(401, "invalid x-api-key")
    if not _header(entry, "anthropic-version"):
        return _anthropic_error(400, "anthropic-version: header is required")
    req = entry["body"]
    if not isinstance(req, dict):
        return _anthropic_error(400, "The request body is not valid JSON.")
    if subpath.endswith("/count_tokens"):
        return _json_reply(200, {"input_tokens": _prompt_tokens(req.get("messages")) + _words(req.get("system"))})
    for field, kind in (("model", str), ("max_tokens", int), ("messages", list)):
        if not isinstance(req.get(field), kind):
            return _anthropic_error(400, f"{field}: Field required")
    n_out, width = _n_out(behaviour, req["max_tokens"]), behaviour.get("word_bytes", 0)
    message = {
        "id": "msg_fake%020d" % next(state.ids),
        "type": "message",
        "role": "assistant",
        "model": req["model"],
        "content": [{"type": "text", "text": _text(n_out, width)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    if behaviour.get("usage", True):
        prompt = _prompt_tokens(req["messages"]) + _words(req.get("system"))
        message["usage"] = _anthropic_usage(prompt, n_out + behaviour.get("reasoning_tokens", 0), behaviour)
    entry["usage"] = message.get("usage")
    if req.get("stream") is True:
        return Reply(200, SSE, events=_anthropic_events(message, n_out, width, behaviour.get("minimal_delta", False)))
    return _json_reply(200, message)


# --- Google Gemini generateContent ------------------------------------------------------

_google_dumps = json.JSONEncoder(separators=(",", ": ")).encode  # Gemini's compact SSE style
_google_pretty = json.JSONEncoder(indent=2).encode  # and its pretty-printed JSON bodies
_GOOGLE_JSON = [(b"content-type", b"application/json; charset=UTF-8")]
_GOOGLE_PATH = re.compile(r"/v1(?:beta|alpha)?/models/([^/:]+):(generateContent|streamGenerateContent|countTokens)")
_GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _google_error(status: int, message: str) -> Reply:
    kind = _GOOGLE_STATUSES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    body = {"error": {"code": status, "message": message, "status": kind}}
    return Reply(status, _GOOGLE_JSON, _google_pretty(body).encode() + b"\n")


def _google_prompt_tokens(req: dict) -> int:
    """3 + sum over contents of (3 + words of its parts) + words of the system instruction's parts."""

    def parts(content: object) -> object:
        return content.get("parts") if isinstance(content, dict) else None

    return 3 + sum(3 + _words(parts(c)) for c in req["contents"]) + _words(parts(req.get("systemInstruction")))


def _google_usage(prompt: int, candidates: int, behaviour: dict) -> dict:
    cached, thoughts = behaviour.get("cached_tokens", 0), behaviour.get("reasoning_tokens", 0)
    usage = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts,
    }
    if cached:
        usage["cachedContentTokenCount"] = cached
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if cached:
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    usage["serviceTier"] = "standard"
    return usage


def _google_response(text: str, done: bool, usage: dict | None, model: str, rid: str) -> dict:
    candidate = {"content": {"parts": [{"text": text}], "role": "model"}}
    if done:
        candidate["finishReason"] = "STOP"
    candidate["index"] = 0
    response = {"candidates": [candidate]}
    if usage is not None:
        response["usageMetadata"] = usage
    response.update(modelVersion=model, responseId=rid)
    return response


def _google_chunks(prompt: int | None, n_out: int, width: int, behaviour: dict, model: str, rid: str) -> Iterator[dict]:
    """One GenerateContentResponse per word (one empty one if n_out is 0), with cumulative usage."""
    for i in range(max(n_out, 1)):
        usage = None if prompt is None else _google_usage(prompt, min(i + 1, n_out), behaviour)
        yield _google_response(_piece(i, width) if n_out else "", i >= n_out - 1, usage, model, rid)


def _google_sse(chunks: Iterator[dict]) -> Iterator[bytes]:
    for chunk in chunks:
        yield b"data: %s\r\n\r\n" % _google_dumps(chunk).encode()


def _google_json_array(chunks: Iterator[dict]) -> Iterator[bytes]:
    separator = b"["
    for chunk in chunks:
        yield separator + _google_pretty(chunk).encode() + b"\n"
        separator = b",\r\n"
    yield b"]"


def google_generate(state: FakeState, entry: dict, behaviour: dict, subpath: str) -> Reply:
    """Gemini API: ``POST /v1beta/models/<model>:generateContent`` and ``:streamGenerateContent``."""
    match = _GOOGLE_PATH.fullmatch(subpath)
    if entry["method"] != "POST" or match is None:
        return _google_error(404, f"Invalid URL ({entry['method']} {entry['path']})")
    query = parse_qs(entry["query"])
    if not (_header(entry, "x-goog-api-key") or query.get("key", [""])[0]):
        return _google_error(
            403,
            "Method doesn't allow unregistered callers (callers without established "
            "identity). Please use API Key or other form of API consumer identity to call "
            "this API.",
        )
    req = entry["body"]
    if not (isinstance(req, dict) and isinstance(req.get("contents"), list)):
        return _google_error(400, "* GenerateContentRequest.contents: contents is not specified")
    if match.group(2) == "countTokens":
        return Reply(200, _GOOGLE_JSON, _google_pretty({"totalTokens": _google_prompt_tokens(req)}).encode() + b"\n")
    config = req.get("generationConfig")
    n_out = _n_out(behaviour, config.get("maxOutputTokens") if isinstance(config, dict) else None)
    width, model, rid = behaviour.get("word_bytes", 0), match.group(1), "fake%020d" % next(state.ids)
    prompt = _google_prompt_tokens(req) if behaviour.get("usage", True) else None
    if prompt is not None:
        entry["usage"] = _google_usage(prompt, n_out, behaviour)
    if match.group(2) == "generateContent":
        usage = entry["usage"]
        body = _google_response(_text(n_out, width), True, usage, model, rid)
        return Reply(200, _GOOGLE_JSON, _google_pretty(body).encode() + b"\n")
    chunks = _google_chunks(prompt, n_out, width, behaviour, model, rid)
    if query.get("alt") == ["sse"]:
        return Reply(200, _chunked(b"text/event-stream"), events=_google_sse(chunks))
    return Reply(200, _chunked(b"application/json; charset=UTF-8"), events=_google_json_array(chunks))


# --- provider table ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Format:
    handler: Handler
    error: Callable[[int, str], Reply] = _error  # the provider's error shape, for injected statuses


FORMATS: dict[str, Format] = {
    "openai": Format(
        openai_compatible(("/chat/completions", "/responses", "/embeddings", "/completions", "/audio/speech"))
    ),
    "mistral": Format(openai_compatible(("/chat/completions", "/embeddings"), usage_unasked=True)),
    "deepseek": Format(
        openai_compatible(
            ("/chat/completions", "/completions"),
            _deepseek_usage,
            {"/beta/completions": "/completions"},
            shows_reasoning=True,
        )
    ),
    "xai": Format(
        openai_compatible(
            ("/chat/completions", "/responses", "/completions"),
            functools.partial(_usage, reasoning_apart=True),
            shows_reasoning=True,
        )
    ),
    "anthropic": Format(anthropic_messages, _anthropic_error),
    "google": Format(google_generate, _google_error),
}


# --- request dispatch -------------------------------------------------------------------


def _control(state: FakeState, method: str, path: str, raw: bytes) -> Reply:
    if method == "POST" and path == "/_fake/behaviours":
        items = _parse_json(raw)
        if not (isinstance(items, list) and all(isinstance(item, dict) for item in items)):
            return _error(400, "expected a JSON list of behaviour objects")
        state.behaviours.extend(items)
    elif method == "GET" and path == "/_fake/requests":
        return _json_reply(200, state.requests)
    elif method == "DELETE" and path == "/_fake/requests":
        state.reset()
    elif method == "POST" and path == "/_fake/release":
        state.release()
    else:
        return _not_found(method, path)
    return _OK


def _record(state: FakeState, method: str, path: str, query: str, headers: h11.Headers, raw: bytes) -> dict:
    parsed = _parse_json(raw)
    entry = {
        "method": method,
        "path": path,
        "query": query,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
        "body": None if parsed is _NOT_JSON else parsed,
    }
    if parsed is _NOT_JSON:
        entry["raw_body"] = raw.decode("utf-8", "replace")
    entry["usage"] = entry["response_status"] = None
    state.requests.append(entry)
    return entry


def _injected(behaviour: dict, error: Callable[[int, str], Reply]) -> Reply:
    status = int(behaviour["status"])
    default = error(status, f"fake injected status {status}")
    body = _dumps(behaviour["body"]).encode() if "body" in behaviour else default.body
    headers = {
        **{k.decode(): v.decode() for k, v in default.headers},
        **{k.lower(): str(v) for k, v in behaviour.get("headers", {}).items()},
    }
    return Reply(status, [(k.encode(), v.encode()) for k, v in headers.items()], body)


def _route(state: FakeState, entry: dict, behaviour: dict) -> Reply:
    provider, _, rest = entry["path"][1:].partition("/")
    fmt = FORMATS.get(provider)
    if "status" in behaviour:
        return _injected(behaviour, _error if fmt is None else fmt.error)
    if fmt is None:
        return _not_found(entry["method"], entry["path"])
    return fmt.handler(state, entry, behaviour, "/" + rest)


# --- HTTP/1.1 plumbing ------------------------------------------------------------------


def _gzip_events(events: Iterable[bytes]) -> Iterator[bytes]:
    """Gzip a stream incrementally; every output piece is decodable on arrival."""
    z, previous = zlib.compressobj(wbits=31), None
    for event in events:
        if previous is not None:
            yield z.compress(previous) + z.flush(zlib.Z_SYNC_FLUSH)
        previous = event
    yield z.compress(previous or b"") + z.flush()


def _response(status: int, headers: list) -> h11.Response:
    return h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    reply: Reply,
    behaviour: dict,
    entry: dict | None = None,
    state: FakeState | None = None,
) -> bool:
    """Write the reply; False if the connection was deliberately cut. A stream's log entry
    counts the events sent and notes when the client went away (`aborted_at`, epoch seconds)."""
    gzip, headers = behaviour.get("gzip"), reply.headers
    if gzip:
        headers = [*headers, (b"content-encoding", b"gzip")]
    if "first_byte_delay" in behaviour:
        await asyncio.sleep(behaviour["first_byte_delay"])
    if reply.events is None:
        body = next(_gzip_events([reply.body])) if gzip else reply.body
        headers = [*headers, (b"content-length", b"%d" % len(body))]
        if "body_cut" in behaviour:  # part of the body, a pause, then the connection closed
            writer.write(conn.send(_response(reply.status, headers)) + body[: behaviour["body_cut"]])
            await writer.drain()
            await asyncio.sleep(behaviour.get("body_stall", 0))
            return False
        writer.write(
            conn.send(_response(reply.status, headers)) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        await writer.drain()
        return True
    events = _gzip_events(reply.events) if gzip else reply.events
    delay, cut = behaviour.get("chunk_delay"), behaviour.get("cut_after")
    writer.write(conn.send(_response(reply.status, headers)))
    for i, event in enumerate(itertools.islice(events, cut)):
        if delay and i:
            await asyncio.sleep(delay)
        try:
            writer.write(conn.send(h11.Data(data=event)))
            await writer.drain()
        except ConnectionError:
            if entry is not None:
                entry["aborted_at"] = time.time()
            raise
        if entry is not None:
            entry["events_sent"] = i + 1
        if state is not None and i + 1 == behaviour.get("pause_after"):
            try:  # until the test says so (a minute at most, not to hang a failed one)
                await asyncio.wait_for(state.released.wait(), 60)
            except TimeoutError:
                pass
    if cut is not None:
        return False
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    return True


async def _respond(
    state: FakeState, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request, raw: bytes
) -> bool:
    """Answer one request; False means close the connection."""
    method = request.method.decode("ascii")
    path, _, query = request.target.decode("latin-1").partition("?")
    if path.startswith("/_fake/"):
        return await _send(conn, writer, _control(state, method, path, raw), _NO_BEHAVIOUR)
    entry = _record(state, method, path, query, request.headers, raw)
    behaviour = state.behaviours.popleft() if state.behaviours else _NO_BEHAVIOUR
    if "hang" in behaviour:
        await asyncio.sleep(behaviour["hang"])
        return False
    reply = _route(state, entry, behaviour)
    entry["response_status"] = reply.status
    return await _send(conn, writer, reply, behaviour, entry, state)


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[h11.Request, bytes] | None:
    request, body = None, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return request, b"".join(body)
        else:  # ConnectionClosed
            return None


async def _handle_connection(state: FakeState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while (got := await _read_request(conn, reader, writer)) is not None:
            if not await _respond(state, conn, writer, *got) or conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            reply = _error(exc.error_status_hint, f"Malformed HTTP request: {exc}")
            headers = [*reply.headers, (b"content-length", b"%d" % len(reply.body)), (b"connection", b"close")]
            writer.write(conn.send(_response(reply.status, headers)) + conn.send(h11.Data(data=reply.body)))
    except (OSError, asyncio.CancelledError):  # client went away / server shutting down
        pass
    finally:
        writer.close()


async def serve(host: str = "127.0.0.1", port: int = 0, state: FakeState | None = None) -> asyncio.Server:
    """Start serving; the bound address is ``server.sockets[0].getsockname()``."""
    state = state or FakeState()
    return await asyncio.start_server(lambda r, w: _handle_connection(state, r, w), host, port, backlog=4096)


async def _run(host: str, port: int) -> None:
    server = await serve(host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"fake provider listening at {bound_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()  # open keep-alive connections are cancelled by asyncio.run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_run(args.host, args.port))


if __name__ == "__main__":
    main()
