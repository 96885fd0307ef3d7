"""Provider wire formats: how usage, identity and generated text are read from a JSON body or
from the events of a stream, and how a request's prompt is estimated when no usage comes.

One class per format; `dialect_for` picks it by the provider's wire format and the endpoint.
Text is collected only to estimate output tokens if the provider never reports usage (a cut
stream, a client gone, a provider that sends none).
"""

import dataclasses
import json
import re

from meterproxy.estimate import TextCounter, chat_prompt_tokens, message_text, text_tokens, tools_tokens
from meterproxy.providers import Wire
from meterproxy.usage import (
    Reply,
    Usage,
    UsageSource,
    anthropic_usage,
    count,
    error_message,
    google_usage,
    openai_usage,
    text,
)


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _limit(tokens: object, choices: object = None) -> int | None:
    """An output limit from the request, times the number of choices it asks for."""
    limit = count(tokens) if tokens is not None else None
    return None if not limit else limit * max(count(choices), 1)


def _strings(values: object) -> list[str]:
    if isinstance(values, str):
        return [values]
    return [value for value in values if isinstance(value, str)] if isinstance(values, list) else []


def json_strings(*keys: str) -> re.Pattern[bytes]:
    """Finds the JSON strings under `keys`; the first group is what is between the quotes."""
    names = "|".join(keys).encode()
    return re.compile(rb'"(?:' + names + rb')"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


class Dialect:
    """A wire format. Where `RAW_TEXT` is set, stream events go to the text counter as they came
    (the pattern finds their text, a batch of events at a time), and once the reply is
    identified only the events `worth_parsing` are parsed."""

    RAW_TEXT: re.Pattern[bytes] | None = None

    def __init__(self, model: str | None):
        self.model = model
        self.usage: Usage | None = None
        self.final = False  # the usage is the provider's last word, not a partial figure
        self.reply = Reply()
        self.text = TextCounter(model, strings=self.RAW_TEXT)
        self._estimate: Usage | None = None

    def read_event(self, data: bytes) -> bool:
        """Meter one stream event's data; True for the usage-only event of OpenAI streams."""
        if self.RAW_TEXT is not None:
            self.text.add(data)
            if self.reply.response_id is not None and not self.worth_parsing(data):
                return False
        event = _json(data)
        return self.event(event) if isinstance(event, dict) else False

    def skim(self, events: bytes) -> bool:
        """Meter whole stream events (each with its blank line) at once, as they came, if none
        of them needs parsing: the usual chunk, once the reply is identified. False leaves them
        to be read one by one."""
        if self.RAW_TEXT is None or self.reply.response_id is None or self.worth_parsing(events):
            return False
        self.text.add(events)
        return True

    def worth_parsing(self, data: bytes) -> bool:
        """Whether a stream event can carry usage or an error."""
        return b'"usage"' in data or b'"error"' in data

    def event(self, event: dict) -> bool:
        raise NotImplementedError

    def read_body(self, body: object) -> None:
        raise NotImplementedError

    def prompt_tokens(self, request: dict) -> int:
        raise NotImplementedError

    def max_output_tokens(self, request: dict) -> int | None:
        """The most output the request allows, or None when it sets no limit."""
        raise NotImplementedError

    def _chat_prompt(self, messages: list, request: dict, system: object = None) -> int:
        """A prompt of messages, with the tools the request offers."""
        return chat_prompt_tokens(messages, self.model, system) + tools_tokens(request.get("tools"), self.model)

    def worst_case(self, request: dict, body_size: int) -> Usage | None:
        """The largest usage the request can have: its prompt is at most one token per byte of
        the body, its output at most its limit. None when the request sets no limit."""
        limit = self.max_output_tokens(request)
        return None if limit is None else Usage(input_tokens=body_size, output_tokens=limit)

    def metered_usage(self, request: dict | None) -> Usage:
        """The provider's usage, or, where it gave none or only a partial figure, an estimate
        from the request and the text that was delivered (worked out once: it runs the tokenizer,
        which the gateway does off its event loop, before the completion asks again)."""
        if self.reported:
            return self.usage
        if self._estimate is None:
            partial = self.usage or Usage(input_tokens=self.prompt_tokens(request or {}))
            self._estimate = Usage(
                input_tokens=partial.input_tokens,
                cached_input_tokens=partial.cached_input_tokens,
                cache_write_tokens=partial.cache_write_tokens,
                output_tokens=self.text.total(),
                source=UsageSource.ESTIMATED,
            )
        return self._estimate

    @property
    def reported(self) -> bool:
        """Whether the provider gave its final usage, so that nothing needs estimating."""
        return self.usage is not None and self.final

    def _set_usage(self, usage: Usage, final: bool = True) -> None:
        self.usage, self.final = usage, final


class OpenAIChat(Dialect):
    """Chat completions, legacy completions and embeddings, of OpenAI and the compatible
    providers. Stream chunks are only parsed when they can carry usage (or identity). The
    reasoning that DeepSeek and xAI (`reasoning_content`) or vLLM-style servers (`reasoning`)
    send before the answer is output the provider bills: an estimate counts it."""

    RAW_TEXT = json_strings("content", "text", "arguments", "refusal", "reasoning_content", "reasoning")
    _USAGE = re.compile(rb'"usage"\s*:\s*\{')

    def worth_parsing(self, data: bytes) -> bool:
        """Only a usage object: `"usage"` is in every chunk once usage is asked for, mostly `null`."""
        usage_at = data.find(b'"usage"')
        return usage_at >= 0 and self._USAGE.search(data, usage_at) is not None

    def event(self, event: dict) -> bool:
        if self.reply.response_id is None:
            self.reply = Reply(text(event.get("id")), text(event.get("model")), error_message(event))
        usage = event.get("usage")
        if not isinstance(usage, dict):
            return False
        self._set_usage(openai_usage(usage))  # cumulative: the last one is the total
        return event.get("choices") == []

    def read_body(self, body: object) -> None:
        if not isinstance(body, dict):
            return
        self.reply = Reply(text(body.get("id")), text(body.get("model")), error_message(body))
        if isinstance(body.get("usage"), dict):
            self._set_usage(openai_usage(body["usage"]))
            return
        for choice in [choice for choice in body.get("choices") or [] if isinstance(choice, dict)]:
            message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            calls = message.get("tool_calls") or []
            for piece in (
                message.get("reasoning_content", message.get("reasoning")),
                message.get("content"),
                choice.get("text"),
                *[(call.get("function") or {}).get("arguments") for call in calls],
            ):
                self.text.add(piece if isinstance(piece, str) else "")

    def prompt_tokens(self, request: dict) -> int:
        if isinstance(request.get("messages"), list):
            return self._chat_prompt(request["messages"], request)
        pieces = _strings(request.get("prompt")) + _strings(request.get("input"))
        return sum(text_tokens(piece, self.model) for piece in pieces)

    def max_output_tokens(self, request: dict) -> int | None:
        if "messages" not in request and "prompt" not in request:
            return 0  # embeddings
        return _limit(request.get("max_completion_tokens", request.get("max_tokens")), request.get("n"))


class OpenAIResponses(Dialect):
    """The Responses API: text arrives in `*.delta` events, usage in `response.completed`."""

    RAW_TEXT = json_strings("delta")

    def event(self, event: dict) -> bool:
        response = event.get("response")
        if isinstance(response, dict):
            self._identify(response)
        return False

    def read_body(self, body: object) -> None:
        if not isinstance(body, dict):
            return
        self._identify(body)
        if self.usage is None:
            for item in body.get("output") or []:  # messages' content, reasoning items' summary
                parts = [*(item.get("summary") or []), *(item.get("content") or [])] if isinstance(item, dict) else []
                for part in parts:
                    self.text.add(text(part.get("text")) or "" if isinstance(part, dict) else "")

    def _identify(self, response: dict) -> None:
        self.reply = Reply(text(response.get("id")), text(response.get("model")), error_message(response))
        if isinstance(response.get("usage"), dict):
            self._set_usage(openai_usage(response["usage"]))

    def prompt_tokens(self, request: dict) -> int:
        prompt = request.get("input")
        if isinstance(prompt, list):
            return self._chat_prompt(prompt, request, request.get("instructions"))
        pieces = _strings(prompt) + _strings(request.get("instructions"))
        return sum(text_tokens(piece, self.model) for piece in pieces) + tools_tokens(request.get("tools"), self.model)

    def max_output_tokens(self, request: dict) -> int | None:
        return _limit(request.get("max_output_tokens"))


class Anthropic(Dialect):
    """Messages: `message_start` has the input figures, `message_delta` the cumulative output;
    only the latter makes the usage final."""

    RAW_TEXT = json_strings("text", "partial_json", "thinking")

    def event(self, event: dict) -> bool:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            self.reply = Reply(text(message.get("id")), text(message.get("model")))
            if isinstance(message.get("usage"), dict):
                self._set_usage(anthropic_usage(message["usage"]), final=False)
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            self._set_usage(anthropic_usage(event["usage"], self.usage))
        elif kind == "error":
            self.reply.error = error_message(event)
        return False

    def read_body(self, body: object) -> None:
        if not isinstance(body, dict):
            return
        self.reply = Reply(text(body.get("id")), text(body.get("model")), error_message(body))
        if isinstance(body.get("usage"), dict):
            self._set_usage(anthropic_usage(body["usage"]))
            return
        for block in body.get("content") or []:
            if isinstance(block, dict):
                self.text.add(text(block.get("text")) or text(block.get("thinking")) or "")

    def prompt_tokens(self, request: dict) -> int:
        return self._chat_prompt(request.get("messages") or [], request, request.get("system"))

    def max_output_tokens(self, request: dict) -> int | None:
        return _limit(request.get("max_tokens"))


class Google(Dialect):
    """Gemini: every response (and every stream chunk) carries cumulative `usageMetadata`."""

    def event(self, event: dict) -> bool:
        self._read(event)
        return False

    def read_body(self, body: object) -> None:
        for response in body if isinstance(body, list) else [body]:
            if isinstance(response, dict):
                self._read(response)

    def _read(self, response: dict) -> None:
        self.reply = Reply(
            text(response.get("responseId")) or self.reply.response_id,
            text(response.get("modelVersion")) or self.reply.model,
            error_message(response),
        )
        if isinstance(response.get("usageMetadata"), dict):
            self._set_usage(google_usage(response["usageMetadata"]))
        for candidate in response.get("candidates") or []:
            content = candidate.get("content") if isinstance(candidate, dict) else None
            self.text.add(message_text(content))

    def prompt_tokens(self, request: dict) -> int:
        return self._chat_prompt(request.get("contents") or [], request, request.get("systemInstruction"))

    def max_output_tokens(self, request: dict) -> int | None:
        config = request.get("generationConfig") if isinstance(request.get("generationConfig"), dict) else {}
        return _limit(config.get("maxOutputTokens"), config.get("candidateCount"))


class FromRequest(Dialect):
    """An endpoint whose usage the request alone tells: the answer is not read for it."""

    def event(self, event: dict) -> bool:
        return False

    def read_body(self, body: object) -> None:
        pass

    def prompt_tokens(self, request: dict) -> int:
        return 0

    def max_output_tokens(self, request: dict) -> int | None:
        return 0

    def worst_case(self, request: dict, body_size: int) -> Usage:
        return self.metered_usage(request)

    def metered_usage(self, request: dict | None) -> Usage:
        return Usage()


class Speech(FromRequest):
    """Audio speech is billed by the characters of its input (tts-1), or by its tokens, which
    only a stream of events tells (`stream_format: "sse"`, usage in `speech.audio.done`): the
    audio itself is not read."""

    def read_event(self, data: bytes) -> bool:
        if b'"speech.audio.done"' in data:
            event = _json(data)
            if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                self._set_usage(openai_usage(event["usage"]))
        return False

    def metered_usage(self, request: dict | None) -> Usage:
        characters = len(text((request or {}).get("input")) or "")
        if self.reported:
            return dataclasses.replace(self.usage, input_characters=characters)
        return Usage(input_characters=characters)


class TokenCount(FromRequest):
    """Counting a prompt's tokens (Anthropic's `count_tokens`, Gemini's `countTokens`, OpenAI's
    `responses/input_tokens`) is free: the count it answers was not used, and costs nothing."""


# The paths of the token-counting endpoints, by wire format.
_TOKEN_COUNT = re.compile(r"/messages/count_tokens$|:countTokens$|/responses/input_tokens$")


def dialect_for(wire: Wire, path: str, model: str | None) -> Dialect:
    if _TOKEN_COUNT.search(path):
        return TokenCount(model)
    if wire is Wire.ANTHROPIC:
        return Anthropic(model)
    if wire is Wire.GOOGLE:
        return Google(model)
    if path.endswith("/responses"):
        return OpenAIResponses(model)
    if path.endswith("/audio/speech"):
        return Speech(model)
    return OpenAIChat(model)
