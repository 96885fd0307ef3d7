"""Metering: the request body is checked, streams are teed through a `StreamMeter`, and the
usage the provider reports is read from the body or the event stream as it passes."""

import json
import re

from mitmproxy import http

from addons.calls import call_of, fail_closed, refuse
from meterproxy.dialects import OpenAIChat, dialect_for
from meterproxy.errors import GatewayError
from meterproxy.providers import Wire
from meterproxy.stream import StreamMeter, make_decoder

_GEMINI_MODEL = re.compile(r"/models/([^/:]+):(\w+)")


class Metering:
    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal:
            return
        wire = call.target.provider.wire
        path = flow.request.path.partition("?")[0]
        gemini = _GEMINI_MODEL.search(path) if wire is Wire.GOOGLE else None
        try:
            body = _json_body(flow.request, model_in_body=gemini is None)
        except GatewayError as error:
            refuse(flow, call, error)
            return
        call.request_body = body
        call.model = gemini[1] if gemini else body.get("model") if body else None
        call.stream = (gemini is not None and gemini[2] == "streamGenerateContent") or bool(
            body and body.get("stream") is True
        )
        call.dialect = dialect_for(wire, path, call.model)
        asks = call.target.provider.stream_options
        if call.stream and asks and isinstance(call.dialect, OpenAIChat) and not _asks_usage(body):
            call.drop_usage_event = True
            # Dropping an event needs the plain bytes of the stream.
            flow.request.headers["accept-encoding"] = "identity"
            flow.request.content = _asking_usage(flow.request.content, body)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal or call.upstream_failure or call.dialect is None or call.cache_hit:
            return
        if flow.response.status_code >= 400:
            return  # an error, whatever its type, is read whole: to retry it, and to scrub a key it quotes
        headers = flow.response.headers
        content_type = headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            encoding = headers.get("content-encoding", "")
            try:
                decode = make_decoder(encoding)
            except ValueError:
                flow.response.stream = True  # cannot be read: passed on, estimated at the end
                return
            call.meter = StreamMeter(call.dialect, decode, call.drop_usage_event)
            if call.cache_entry is not None:  # kept as the client received it, if it ends well
                call.meter.tap = []
            flow.response.stream = call.meter
            if call.drop_usage_event and encoding:
                headers.pop("content-encoding")  # the meter hands on the decoded events
        elif "json" not in content_type:
            flow.response.stream = True  # audio and other bodies the meter does not read

    def response(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal or call.dialect is None or flow.response.stream or call.cache_hit:
            return
        try:
            body = json.loads(flow.response.content or b"")
        except (ValueError, RecursionError):
            return
        call.dialect.read_body(body)


def _json_body(request: http.Request, model_in_body: bool) -> dict | None:
    """The request's JSON object (with its `model` where the endpoint needs one), or None for
    requests without a body."""
    if not request.raw_content:
        return None
    try:
        body = json.loads(request.content)
    except (ValueError, RecursionError):
        raise GatewayError(400, "request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", "invalid_json")
    if model_in_body and (not isinstance(body.get("model"), str) or not body["model"]):
        raise GatewayError(400, "request body has no model", "missing_model")
    return body


def _asking_usage(content: bytes, body: dict) -> bytes:
    """The request body (`content`, parsed as `body`) with `stream_options.include_usage` set.
    Without options of its own, the client's bytes are kept and the option added before the
    object's closing brace: no second serialization of what may be a long prompt."""
    options = body.get("stream_options")
    kept = content.rstrip()
    if options is None and "stream_options" not in body and kept.endswith(b"}"):
        return kept[:-1] + b',"stream_options":{"include_usage":true}}'
    options = options if isinstance(options, dict) else {}
    return json.dumps({**body, "stream_options": {**options, "include_usage": True}}).encode()


def _asks_usage(body: dict) -> bool:
    """Whether the client asked for the stream's usage event itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
