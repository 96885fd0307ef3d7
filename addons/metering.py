"""Metering: the request body is checked, streams are teed through a `StreamMeter`, and the
usage the provider reports is read from the body or the event stream as it passes."""

import json

from mitmproxy import http

from addons.calls import fail_closed, call_of, refuse
from meterproxy.errors import GatewayError
from meterproxy.providers import Wire
from meterproxy.stream import OpenAIEvents, StreamMeter, make_decoder
from meterproxy.usage import openai_reply

# Streams for which an OpenAI-compatible provider reports usage only when asked.
USAGE_ON_REQUEST = ("/chat/completions", "/completions")


class Metering:
    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal:
            return
        try:
            body = _json_body(flow.request)
        except GatewayError as error:
            refuse(flow, call, error)
            return
        if body is None:
            return
        call.model = body["model"]
        call.stream = body.get("stream") is True
        if call.stream and call.target.provider.wire is Wire.OPENAI and _asks_usage(flow, body):
            call.drop_usage_event = True
            # We may drop an event, which needs the plain bytes of the stream.
            flow.request.headers["accept-encoding"] = "identity"
            flow.request.content = json.dumps(body).encode()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal:
            return
        headers = flow.response.headers
        if not headers.get("content-type", "").startswith("text/event-stream"):
            return  # a JSON body: buffered by mitmproxy and read whole at `response`
        encoding = headers.get("content-encoding", "")
        try:
            decode = make_decoder(encoding)
        except ValueError:
            return  # cannot be read: no usage, so the row says so
        call.meter = StreamMeter(OpenAIEvents(), decode, call.drop_usage_event)
        if call.drop_usage_event and encoding:
            headers.pop("content-encoding")  # the meter hands on the decoded events
        flow.response.stream = call.meter

    def response(self, flow: http.HTTPFlow) -> None:
        call = call_of(flow)
        if call is None or call.refusal:
            return
        if call.meter is not None:
            call.usage, call.reply = call.meter.events.usage, call.meter.events.reply
            return
        try:
            body = json.loads(flow.response.content or b"")
        except ValueError:
            return
        if isinstance(body, dict):
            call.usage, call.reply = openai_reply(body)


def _json_body(request: http.Request) -> dict | None:
    """The request's JSON object with its `model`, or None for requests without a body."""
    if not request.raw_content:
        return None
    try:
        body = json.loads(request.content)
    except ValueError:
        raise GatewayError(400, "request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", "invalid_json")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise GatewayError(400, "request body has no model", "missing_model")
    return body


def _asks_usage(flow: http.HTTPFlow, body: dict) -> bool:
    """Add `stream_options.include_usage` unless the client asked for it; True if added."""
    if not flow.request.path.partition("?")[0].endswith(USAGE_ON_REQUEST):
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True
