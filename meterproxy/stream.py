"""Metering a streamed response as it passes, chunk by chunk, never holding the whole stream.

`StreamMeter` is the callable mitmproxy calls per read (`flow.response.stream`): it decodes
the content-encoding incrementally, splits server-sent events, hands each event to the
provider's `Dialect` and returns the bytes the client should get: the provider's bytes
unchanged, or, when the gateway itself asked for the usage event, the same events without it.
"""

import logging
import re
import time
import zlib
from collections.abc import Callable

import brotli
import zstandard

from meterproxy.dialects import Dialect

log = logging.getLogger(__name__)
TAP_LIMIT = 8 * 1024 * 1024  # the largest stream kept for the cache
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


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
        return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete events (with their blank-line terminator) and the incomplete rest."""
    if buffer.endswith(b"\n\n") and buffer.find(b"\n\n") == len(buffer) - 2 and b"\r" not in buffer:
        return [buffer], b""  # the usual chunk: exactly one event
    events = []
    start = 0
    for match in _EVENT_END.finditer(buffer):
        events.append(buffer[start : match.end()])
        start = match.end()
    return events, buffer[start:]


def event_data(event: bytes) -> bytes:
    """The joined `data:` lines of one event."""
    if event.startswith(b"data:") and event.endswith(b"\n\n") and event.find(b"\n") == len(event) - 2:
        return event[5:-2].lstrip(b" ")  # the usual event: one `data:` line, then `\n\n`
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


class StreamMeter:
    def __init__(self, dialect: Dialect, decode: Callable[[bytes], bytes], drop_usage_event: bool):
        self.dialect = dialect
        self._decode = decode
        self._drop_usage_event = drop_usage_event
        self._pending = b""
        self.readable = True  # False once the bytes stop decoding: passed on, no longer metered
        self.last_chunk_at = time.monotonic()  # for the idle timeout
        self.tap: list[bytes] | None = None  # set to a list to keep what the client gets
        self.tap_limit = TAP_LIMIT

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        self.last_chunk_at = time.monotonic()
        out = chunk
        if self.readable:
            try:
                kept = self._read(chunk)
            except Exception:  # events nobody foresaw: the stream goes on, estimated at its end
                log.exception("stream stopped being read; passing it on unmetered")
                self.readable = False
            if self._drop_usage_event and self.readable:
                out = kept
        if self.tap is not None:
            self._keep(out)
        # Never return b"" for a non-empty chunk: mitmproxy would end the response there.
        return [out] if out else []

    def _keep(self, out: bytes) -> None:
        self.tap_limit -= len(out)
        if self.tap_limit < 0:
            self.tap = None  # too large to keep: the stream still passes
        else:
            self.tap.append(out)

    def _read(self, chunk: bytes) -> bytes:
        """Meter the chunk's complete events; returns those the client gets (all but the usage
        event the gateway asked for), decoded."""
        try:
            decoded = self._decode(chunk) if chunk else b""
        except (zlib.error, brotli.error, zstandard.ZstdError) as error:
            log.warning("stream stopped decoding (%s); passing it on unmetered", error)
            self.readable = False
            return b""
        buffered = self._pending + decoded if self._pending else decoded
        if chunk and buffered.endswith(b"\n\n") and b"\r" not in buffered and self.dialect.skim(buffered):
            self._pending = b""
            return buffered  # whole events, none of them worth parsing: all kept
        events, self._pending = split_events(buffered)
        if not chunk and self._pending:  # end of stream: an unterminated last event counts too
            events.append(self._pending)
            self._pending = b""
        kept = None  # the events kept, once one is dropped
        for at, event in enumerate(events):
            data = event_data(event)
            if data and data != b"[DONE]" and self.dialect.read_event(data):
                kept = events[:at] if kept is None else kept
            elif kept is not None:
                kept.append(event)
        if kept is None and not self._pending:
            return buffered  # the usual chunk: whole events, all kept
        return b"".join(events if kept is None else kept)
