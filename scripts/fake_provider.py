#!/usr/bin/env python3
"""Fake AI-provider upstream for meterproxy integration tests and benchmarks.

A single-process asyncio + h11 HTTP/1.1 server (keep-alive, no threads) that
speaks the OpenAI chat-completions wire format.  The first path segment names
the emulated provider: /openai, /mistral, /deepseek and /xai are all
OpenAI-compatible and serve ``POST <prefix>/v1/chat/completions`` and
``POST <prefix>/chat/completions``.  Other formats (anthropic, google) plug in
as further entries of ``FORMATS``.

Deterministic output:

* n_out = behaviour ``words``, else request ``max_tokens``, else
  ``max_completion_tokens``, else 5.  Word i is ``f"w{i}"`` (right-padded with
  "x" to ``word_bytes`` bytes if that behaviour is set); text = words joined by
  single spaces, so stream delta i is ``"w0"`` for i == 0, else ``" w{i}"``.
* prompt_tokens = 3 + sum over messages of (3 + whitespace-separated words of
  the content string, or of every part's ``text`` when content is a list).
* completion_tokens = n_out + reasoning_tokens; total = prompt + completion.

Control endpoints (never forwarded by the gateway; they do not consume
behaviours and are not logged):

* ``POST /_fake/behaviours`` – JSON list of objects, each applied FIFO to one
  following request: status/body/headers, cached_tokens, reasoning_tokens,
  usage (false = omit), chunk_delay, first_byte_delay, cut_after (close the
  connection after that many SSE events, without the terminating chunk),
  hang, words, word_bytes, gzip.
* ``GET /_fake/requests`` – log of every other request seen (response_status is
  null if nothing was answered, e.g. ``hang``).
* ``DELETE /_fake/requests`` – clear the log and pending behaviours.

Usage: ``fake_provider.py [--host 127.0.0.1] [--port 0]`` prints
``fake provider listening at HOST:PORT`` and serves until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time
import zlib
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, Iterable, Iterator

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
    events: Iterable[bytes] | None = None  # SSE events: streamed, one HTTP chunk each


class FakeState:
    """Pending behaviours, request log and id counter shared by all connections."""

    def __init__(self) -> None:
        self.behaviours: deque[dict] = deque()
        self.requests: list[dict] = []
        self.ids = itertools.count(1)

    def reset(self) -> None:
        self.behaviours.clear()
        self.requests.clear()


def _json_reply(status: int, value: object, headers: list | None = None) -> Reply:
    return Reply(status, headers or JSON, _dumps(value).encode())


def _error(status: int, message: str, code: str | None = None, type_: str = "invalid_request_error") -> Reply:
    return _json_reply(status, {"error": {"message": message, "type": type_, "param": None, "code": code}})


_OK = _json_reply(200, {"ok": True})
_UNAUTHORIZED = _error(401, "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                       "invalid_api_key")


def _not_found(method: str, path: str) -> Reply:
    return _error(404, f"Invalid URL ({method} {path})")


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return _NOT_JSON


# --- OpenAI-compatible chat completions -------------------------------------------------

OPENAI_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


def _has_bearer(headers: list[list[str]]) -> bool:
    for name, value in headers:
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            return scheme.lower() == "bearer" and bool(token.strip())
    return False


def _prompt_tokens(messages: object) -> int:
    total = 3
    for message in messages if isinstance(messages, list) else ():
        total += 3
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(p["text"].split()) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def _usage(req: dict, n_out: int, behaviour: dict) -> dict:
    prompt = _prompt_tokens(req.get("messages"))
    reasoning = behaviour.get("reasoning_tokens", 0)
    completion = n_out + reasoning
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": behaviour.get("cached_tokens", 0), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _n_out(req: dict, behaviour: dict) -> int:
    for n in (behaviour.get("words"), req.get("max_tokens"), req.get("max_completion_tokens")):
        if isinstance(n, int):
            return n
    return 5


def _word(i: int, width: int) -> str:
    return f"w{i}".ljust(width, "x")


def _chat_chunks(rid: str, created: int, model: str, n_out: int, width: int, usage: dict | None) -> Iterator[bytes]:
    """SSE events of a streamed completion; usage is None unless the usage chunk is wanted."""
    head = ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"service_tier":"default",'
            '"system_fingerprint":"fp_fake","choices":' % (rid, created, _dumps(model)))
    tail = "}\n\n" if usage is None else ',"usage":null}\n\n'

    def event(delta: str, finish: str = "null") -> bytes:
        return f'{head}[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{tail}'.encode()

    yield event('{"role":"assistant","content":"","refusal":null}')
    for i in range(n_out):
        yield event('{"content":"%s%s"}' % (" " if i else "", _word(i, width)))
    yield event("{}", '"stop"')
    if usage is not None:
        yield f'{head}[],"usage":{_dumps(usage)}}}\n\n'.encode()
    yield b"data: [DONE]\n\n"


def _chat_completion(state: FakeState, entry: dict, behaviour: dict, req: dict) -> Reply:
    n_out, width = _n_out(req, behaviour), behaviour.get("word_bytes", 0)
    usage = _usage(req, n_out, behaviour) if behaviour.get("usage", True) else None
    rid, created, model = "chatcmpl-fake%020d" % next(state.ids), int(time.time()), req["model"]
    if req.get("stream") is True:
        options = req.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            usage = None
        entry["usage"] = usage
        return Reply(200, SSE, events=_chat_chunks(rid, created, model, n_out, width, usage))
    entry["usage"] = usage
    text = " ".join(_word(i, width) for i in range(n_out))
    body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                                 "annotations": []},
                         "logprobs": None, "finish_reason": "stop"}],
            **({"usage": usage} if usage is not None else {}),
            "service_tier": "default", "system_fingerprint": "fp_fake"}
    return _json_reply(200, body)


def openai_compatible(state: FakeState, entry: dict, behaviour: dict, subpath: str) -> Reply:
    """OpenAI wire format (used for openai, mistral, deepseek, xai)."""
    if entry["method"] != "POST" or subpath not in OPENAI_CHAT_PATHS:
        return _not_found(entry["method"], entry["path"])
    if not _has_bearer(entry["headers"]):
        return _UNAUTHORIZED
    req = entry["body"]
    if not isinstance(req, dict):
        return _error(400, "We could not parse the JSON body of your request.")
    if not isinstance(req.get("model"), str):
        return _error(400, "you must provide a model parameter")
    return _chat_completion(state, entry, behaviour, req)


Handler = Callable[[FakeState, dict, dict, str], Reply]
FORMATS: dict[str, Handler] = {name: openai_compatible for name in ("openai", "mistral", "deepseek", "xai")}


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
    else:
        return _not_found(method, path)
    return _OK


def _record(state: FakeState, method: str, path: str, query: str, headers: h11.Headers, raw: bytes) -> dict:
    parsed = _parse_json(raw)
    entry = {"method": method, "path": path, "query": query,
             "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
             "body": None if parsed is _NOT_JSON else parsed}
    if parsed is _NOT_JSON:
        entry["raw_body"] = raw.decode("utf-8", "replace")
    entry["usage"] = entry["response_status"] = None
    state.requests.append(entry)
    return entry


def _injected(behaviour: dict) -> Reply:
    status = int(behaviour["status"])
    body = behaviour.get("body", {"error": {"message": f"fake injected status {status}",
                                            "type": "server_error" if status >= 500 else "invalid_request_error",
                                            "param": None, "code": None}})
    headers = {"content-type": "application/json",
               **{k.lower(): str(v) for k, v in behaviour.get("headers", {}).items()}}
    return _json_reply(status, body, [(k.encode(), v.encode()) for k, v in headers.items()])


def _route(state: FakeState, entry: dict, behaviour: dict) -> Reply:
    provider, _, rest = entry["path"][1:].partition("/")
    handler = FORMATS.get(provider)
    if handler is None:
        return _not_found(entry["method"], entry["path"])
    return handler(state, entry, behaviour, "/" + rest)


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


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, behaviour: dict) -> bool:
    """Write the reply; False if the connection was deliberately cut."""
    gzip, headers = behaviour.get("gzip"), reply.headers
    if gzip:
        headers = [*headers, (b"content-encoding", b"gzip")]
    if "first_byte_delay" in behaviour:
        await asyncio.sleep(behaviour["first_byte_delay"])
    if reply.events is None:
        body = next(_gzip_events([reply.body])) if gzip else reply.body
        headers = [*headers, (b"content-length", b"%d" % len(body))]
        writer.write(conn.send(_response(reply.status, headers)) + conn.send(h11.Data(data=body))
                     + conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True
    events = _gzip_events(reply.events) if gzip else reply.events
    delay, cut = behaviour.get("chunk_delay"), behaviour.get("cut_after")
    writer.write(conn.send(_response(reply.status, headers)))
    for i, event in enumerate(itertools.islice(events, cut)):
        if delay and i:
            await asyncio.sleep(delay)
        writer.write(conn.send(h11.Data(data=event)))
        await writer.drain()
    if cut is not None:
        return False
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    return True


async def _respond(state: FakeState, conn: h11.Connection, writer: asyncio.StreamWriter,
                   request: h11.Request, raw: bytes) -> bool:
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
    reply = _injected(behaviour) if "status" in behaviour else _route(state, entry, behaviour)
    entry["response_status"] = reply.status
    return await _send(conn, writer, reply, behaviour)


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> tuple[h11.Request, bytes] | None:
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
