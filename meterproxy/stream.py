"""Metering a streamed response as it passes, chunk by chunk, never holding the whole stream.

`StreamMeter` is the callable mitmproxy calls per read (`flow.response.stream`): it decodes
the content-encoding incrementally, splits server-sent events, reads usage from the events
that can carry it and returns the bytes the client should get: the provider's bytes unchanged,
or, when the gateway itself asked for the usage event, the same events without that one.
"""

import json
import re
import zlib
from collections.abc import Callable

import brotli
import zstandard

from meterproxy.usage import Reply, Usage, openai_reply

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_OPENAI_USAGE = re.compile(rb'"usage"\s*:\s*\{')


def make_decoder(content_encoding: str) -> Callable[[bytes], bytes]:
    """An incremental decoder for a Content-Encoding; raises ValueError for unknown ones."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return bytes
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(zlib.MAX_WBITS | 32).decompress  # gzip or zlib header
    if encoding == "br":
        return brotli.Decompressor().process
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete events (with their blank-line terminator) and the incomplete rest."""
    events = []
    start = 0
    for match in _EVENT_END.finditer(buffer):
        events.append(buffer[start : match.end()])
        start = match.end()
    return events, buffer[start:]


def event_data(event: bytes) -> bytes:
    """The joined `data:` lines of one event."""
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


class OpenAIEvents:
    """Usage from OpenAI-format chunks: only chunks that contain a usage object are parsed."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.reply = Reply()

    def read(self, data: bytes) -> bool:
        """Meter one event's data; True when it is the usage-only chunk (`choices: []`)."""
        if self.reply.response_id is not None and not _OPENAI_USAGE.search(data):
            return False
        try:
            body = json.loads(data)
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        usage, reply = openai_reply(body)
        if self.reply.response_id is None:
            self.reply = reply
        if usage is None:
            return False
        self.usage = usage  # usage events are cumulative: the last one is the total
        return body.get("choices") == []


class StreamMeter:
    def __init__(self, events: OpenAIEvents, decode: Callable[[bytes], bytes], drop_usage_event: bool):
        self.events = events
        self._decode = decode
        self._drop_usage_event = drop_usage_event
        self._pending = b""
        self.received_bytes = 0

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        self.received_bytes += len(chunk)
        events, self._pending = split_events(self._pending + self._decode(chunk))
        kept = [event for event in events if not self._read(event)]
        if not self._drop_usage_event:
            return [chunk] if chunk else []
        if not chunk:  # end of stream: flush an unterminated last event as it came
            kept.append(self._pending)
            self._pending = b""
        # Never return b"" for a non-empty chunk: mitmproxy would end the response there.
        out = b"".join(kept)
        return [out] if out else []

    def _read(self, event: bytes) -> bool:
        data = event_data(event)
        return bool(data) and data != b"[DONE]" and self.events.read(data)
