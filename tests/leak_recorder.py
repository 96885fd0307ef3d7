"""A test-only mitmproxy script, loaded after the gateway by tests/harness.py: it appends every
response the gateway sends a client (status, headers and body, streams chunk by chunk) to the
file in $METERPROXY_TEST_RECORD, so that the key-leak test can search all of them. It also
marks there each request head the gateway has read (`> METHOD path`, no query), so that a test
can wait for that instead of sleeping."""

import os

from mitmproxy import http


class Recorder:
    def __init__(self) -> None:
        self.path = os.environ.get("METERPROXY_TEST_RECORD")

    def _write(self, data: bytes) -> None:
        if self.path:
            with open(self.path, "ab") as record:
                record.write(data)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._write(f"> {flow.request.method} {flow.request.path.split('?')[0]}\n".encode())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        head = f"{flow.response.status_code}\n".encode() + bytes(flow.response.headers) + b"\n"
        self._write(head)
        stream = flow.response.stream
        if callable(stream):

            def recorded(chunk: bytes):
                out = stream(chunk)
                parts = [out] if isinstance(out, bytes) else list(out)
                self._write(b"".join(parts))
                return parts

            flow.response.stream = recorded

    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.response.stream and flow.response.raw_content:
            self._write(flow.response.raw_content + b"\n")


addons = [Recorder()]
