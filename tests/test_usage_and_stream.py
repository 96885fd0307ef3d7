"""Usage extraction (meterproxy/usage.py) and stream metering (meterproxy/stream.py, SPEC §3.4)."""

import dataclasses
import gzip
import json
import random
import zlib
from decimal import Decimal

import brotli
import pytest
import zstandard

from meterproxy import dialects
from meterproxy.dialects import Anthropic, OpenAIChat, OpenAIResponses, TokenCount, dialect_for
from meterproxy.estimate import RAW_BATCH, TextCounter, chat_prompt_tokens, text_tokens, tools_tokens
from meterproxy.providers import Wire
from meterproxy.stream import StreamMeter, make_decoder
from meterproxy.usage import Reply, Usage, UsageSource, openai_usage
from pricing.prices import PRICED_APART

# --- openai_usage -----------------------------------------------------------------------------


def test_chat_completions_usage_with_cached_and_reasoning_tokens():
    usage = {
        "prompt_tokens": 1187,
        "completion_tokens": 650,
        "total_tokens": 1837,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 576,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    assert openai_usage(usage) == Usage(
        input_tokens=1187, output_tokens=650, cached_input_tokens=1024, reasoning_tokens=576
    )


def test_responses_api_field_names():
    usage = {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 32},
        "total_tokens": 380,
    }
    assert openai_usage(usage) == Usage(
        input_tokens=328, output_tokens=52, cached_input_tokens=256, reasoning_tokens=32
    )


def test_deepseek_cache_hit_tokens():
    usage = {
        "prompt_tokens": 20,
        "completion_tokens": 10,
        "total_tokens": 30,
        "prompt_cache_hit_tokens": 12,
        "prompt_cache_miss_tokens": 8,
    }
    assert openai_usage(usage) == Usage(input_tokens=20, output_tokens=10, cached_input_tokens=12)


def test_xai_reasoning_counted_apart_from_its_completion_tokens_is_output():
    # xAI's own example: its total is prompt + completion + reasoning, where OpenAI's completion
    # tokens already include the reasoning.
    usage = {
        "prompt_tokens": 32,
        "completion_tokens": 9,
        "total_tokens": 135,
        "prompt_tokens_details": {"text_tokens": 32, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 6},
        "completion_tokens_details": {"reasoning_tokens": 94, "audio_tokens": 0},
    }
    assert openai_usage(usage) == Usage(input_tokens=32, output_tokens=103, cached_input_tokens=6, reasoning_tokens=94)
    within = {**usage, "completion_tokens": 103, "total_tokens": 135}  # OpenAI's convention: counted once
    assert openai_usage(within).output_tokens == 103


@pytest.mark.parametrize(
    "wire, path",
    [
        (Wire.ANTHROPIC, "/v1/messages/count_tokens"),
        (Wire.GOOGLE, "/v1beta/models/gemini-2.5-flash:countTokens"),
        (Wire.OPENAI, "/v1/responses/input_tokens"),
    ],
)
def test_the_token_counting_endpoints_cost_nothing(wire, path):
    dialect = dialect_for(wire, path, "m")
    request = {"model": "m", "messages": [{"role": "user", "content": "count me " * 100}]}
    assert isinstance(dialect, TokenCount)
    dialect.read_body({"input_tokens": 203})
    assert dialect.metered_usage(request) == dialect.worst_case(request, 2000) == Usage()


def test_the_parts_priced_apart_are_read_from_every_wire_format():
    anthropic = dialects.anthropic_usage(
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "output_tokens": 1,
        }
    )
    assert (anthropic.cache_write_tokens, anthropic.cache_write_1h_tokens) == (300, 200)
    later = dialects.anthropic_usage({"output_tokens": 40}, anthropic)  # a message_delta keeps it
    assert (later.cache_write_1h_tokens, later.output_tokens) == (200, 40)
    gemini = dialects.google_usage(
        {
            "promptTokenCount": 120,
            "candidatesTokenCount": 30,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 20}, {"modality": "AUDIO", "tokenCount": 100}],
            "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 30}],
        }
    )
    assert (gemini.input_audio_tokens, gemini.output_audio_tokens) == (100, 30)
    details = {"prompt_tokens_details": {"audio_tokens": 7}, "completion_tokens_details": {"audio_tokens": 9}}
    chat = openai_usage({"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22, **details})
    assert (chat.input_audio_tokens, chat.output_audio_tokens) == (7, 9)


ANTHROPIC_START = {
    "input_tokens": 10,
    "cache_read_input_tokens": 400,
    "cache_creation_input_tokens": 300,
    "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
    "output_tokens": 1,
}
ANTHROPIC_TOTAL = Usage(
    input_tokens=10 + 400 + 300,
    output_tokens=40,
    cached_input_tokens=400,
    cache_write_tokens=300,
    cache_write_1h_tokens=100,
)


@pytest.mark.parametrize(
    "delta",
    [
        {"output_tokens": 40},  # what Anthropic documents: the input figures came in message_start
        {"output_tokens": 40, "input_tokens": 10},
        {"output_tokens": 40, "input_tokens": 10, "cache_read_input_tokens": 400, "cache_creation_input_tokens": 300},
    ],
    ids=["output-only", "with-input", "every-figure"],
)
def test_an_anthropic_message_delta_keeps_the_input_and_cache_figures_of_message_start(delta):
    """Cached reads and cache writes are part of `input_tokens` once, whatever figures the
    `message_delta` repeats (a delta without `input_tokens` counted them twice)."""
    dialect = Anthropic("claude-sonnet-4-5")
    start = {"id": "msg_01", "type": "message", "model": "claude-sonnet-4-5", "usage": ANTHROPIC_START}
    dialect.read_event(json.dumps({"type": "message_start", "message": start}).encode())
    dialect.read_event(json.dumps({"type": "message_delta", "delta": {}, "usage": delta}).encode())
    assert dialect.reported and dialect.metered_usage({}) == ANTHROPIC_TOTAL


@pytest.mark.parametrize(
    "wire, path, request_body, limit",
    [
        (Wire.OPENAI, "/v1/chat/completions", {"messages": [], "max_tokens": 100, "n": 3}, 300),
        (Wire.OPENAI, "/v1/chat/completions", {"messages": [], "max_completion_tokens": 100, "n": 3}, 300),
        (Wire.OPENAI, "/v1/completions", {"prompt": "Hi", "max_tokens": 100, "n": 2}, 200),
        (Wire.OPENAI, "/v1/chat/completions", {"messages": [], "max_tokens": 100, "n": None}, 100),
        (Wire.GOOGLE, "/v1beta/models/g:generateContent", {"generationConfig": {"maxOutputTokens": 100}}, 100),
        (
            Wire.GOOGLE,
            "/v1beta/models/g:generateContent",
            {"generationConfig": {"maxOutputTokens": 100, "candidateCount": 4}},
            400,
        ),
    ],
    ids=["chat-n", "chat-max-completion-n", "completions-n", "chat-n-null", "gemini-one", "gemini-candidates"],
)
def test_the_worst_case_output_is_the_limit_times_the_choices_asked_for(wire, path, request_body, limit):
    """Each of `n` choices (Gemini's `candidateCount`) may use the whole output limit: the
    hold must cover them all."""
    dialect = dialect_for(wire, path, "m")
    assert dialect.max_output_tokens(request_body) == limit
    assert dialect.worst_case(request_body, 120) == Usage(input_tokens=120, output_tokens=limit)


def test_speech_streamed_as_events_is_metered_from_the_usage_of_its_last_one():
    speech = dialect_for(Wire.OPENAI, "/v1/audio/speech", "gpt-4o-mini-tts")
    request = {"model": "gpt-4o-mini-tts", "input": "Hello there", "stream_format": "sse"}
    assert speech.metered_usage(request) == Usage(input_characters=11)  # tts-1's way, until usage comes
    speech.read_event(b'{"type":"speech.audio.delta","audio":"AAAA"}')
    done = b'{"type":"speech.audio.done","usage":{"input_tokens":3,"output_tokens":90,"total_tokens":93}}'
    speech.read_event(done)
    assert speech.metered_usage(request) == Usage(input_tokens=3, output_tokens=90, input_characters=11)


def test_embeddings_usage_has_no_output():
    assert openai_usage({"prompt_tokens": 8, "total_tokens": 8}) == Usage(input_tokens=8)


def test_empty_usage_is_all_zero_from_the_provider():
    usage = openai_usage({})
    assert usage == Usage()
    assert usage.source is UsageSource.PROVIDER


GARBAGE = [None, "12", -3, True, False, 1.5, [4], {"n": 4}]


@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda v: {"prompt_tokens": v, "completion_tokens": 5}, Usage(output_tokens=5)),
        (lambda v: {"prompt_tokens": 5, "completion_tokens": v}, Usage(input_tokens=5)),
        (lambda v: {"input_tokens": v, "output_tokens": 5}, Usage(output_tokens=5)),
        (lambda v: {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": v}}, Usage(input_tokens=5)),
        (lambda v: {"prompt_tokens": 5, "prompt_cache_hit_tokens": v}, Usage(input_tokens=5)),
        (
            lambda v: {"completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": v}},
            Usage(output_tokens=5),
        ),
    ],
    ids=["prompt", "completion", "input", "cached", "deepseek-hit", "reasoning"],
)
def test_garbage_counts_are_zero(make, expected, value):
    assert openai_usage(make(value)) == expected


@pytest.mark.parametrize("details", ["garbage", [1, 2]])
def test_garbage_details_objects_are_zero(details):
    usage = openai_usage({"prompt_tokens": 5, "prompt_tokens_details": details, "completion_tokens_details": details})
    assert usage == Usage(input_tokens=5)


def test_usage_columns_are_the_ledger_columns():
    usage = Usage(input_tokens=3, output_tokens=2, input_seconds=Decimal("1.50"), source=UsageSource.ESTIMATED)
    assert usage.columns() == {
        "input_tokens": 3,
        "output_tokens": 2,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "input_characters": 0,
        "output_characters": 0,
        "input_seconds": "1.50",
        "output_seconds": "0",
        "usage_source": "estimated",
    }
    names = {field.name for field in dataclasses.fields(Usage)}
    # Every figure has its column, but the parts that are only priced apart.
    assert set(usage.columns()) == names - {"source", *PRICED_APART} | {"usage_source"}


# --- an OpenAI JSON body ---------------------------------------------------------------------


def openai_reply(body: dict) -> tuple[Usage | None, Reply]:
    dialect = OpenAIChat("gpt-4o-mini")
    dialect.read_body(body)
    return dialect.usage, dialect.reply


def test_openai_reply_of_a_completion():
    body = {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
    assert openai_reply(body) == (
        Usage(input_tokens=9, output_tokens=1),
        Reply(response_id="chatcmpl-abc123", model="gpt-4o-mini-2024-07-18", error=None),
    )


def test_openai_reply_of_an_error_body():
    body = {
        "error": {
            "message": "Rate limit reached for gpt-4o-mini on tokens per min (TPM)",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert openai_reply(body) == (
        None,
        Reply(response_id=None, model=None, error="Rate limit reached for gpt-4o-mini on tokens per min (TPM)"),
    )


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": 42}},
        {"error": {"code": "x"}},
        {"error": "a bare string"},
        {"error": None},
        {},
    ],
)
def test_openai_reply_without_a_readable_error_message(body):
    assert openai_reply(body) == (None, Reply())


def test_openai_reply_ignores_non_text_identity_and_non_object_usage():
    assert openai_reply({"id": 7, "model": ["gpt"], "usage": None}) == (None, Reply())
    assert openai_reply({"id": "x", "usage": "12"}) == (None, Reply(response_id="x"))


# --- a realistic OpenAI stream ----------------------------------------------------------------

RESPONSE_ID = "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"
MODEL = "gpt-4o-mini-2024-07-18"
USAGE = {
    "prompt_tokens": 1187,
    "completion_tokens": 9,
    "total_tokens": 1196,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
EXPECTED_USAGE = Usage(input_tokens=1187, output_tokens=9, cached_input_tokens=1024)
EXPECTED_REPLY = Reply(response_id=RESPONSE_ID, model=MODEL)


def sse(payload: object, newline: bytes = b"\n") -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    return b"data: " + data + newline + newline


def chunk(choices: list, usage: dict | None = None) -> dict:
    return {
        "id": RESPONSE_ID,
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
        "choices": choices,
        "usage": usage,
    }


def delta(content: str | None = None, role: str | None = None, finish: str | None = None) -> list:
    body = {} if content is None else {"content": content}
    if role:
        body = {"role": role, "content": "", "refusal": None}
    return [{"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}]


def openai_stream(words: list[str], newline: bytes = b"\n") -> tuple[bytes, bytes]:
    """The whole stream as the API sends it with include_usage, and its usage event alone."""
    events = [sse(chunk(delta(role="assistant")), newline)]
    events += [sse(chunk(delta(word)), newline) for word in words]
    events.append(sse(chunk(delta(finish="stop")), newline))
    usage_event = sse(chunk([], USAGE), newline)
    events += [usage_event, sse(b"[DONE]", newline)]
    return b"".join(events), usage_event


WORDS = ["Hello", " there", "!", " How", " can", " I", " help", ' "you"', "\\n today?"]
PLAIN, USAGE_EVENT = openai_stream(WORDS)
CRLF, CRLF_USAGE_EVENT = openai_stream(WORDS, b"\r\n")


def without(stream: bytes, event: bytes) -> bytes:
    assert stream.count(event) == 1
    return stream.replace(event, b"")


def feed(meter: StreamMeter, pieces: list[bytes]) -> bytes:
    """Play a stream through the meter as mitmproxy does (a final b"" marks its end)."""
    out = []
    for piece in [*pieces, b""]:
        result = meter(piece)
        assert isinstance(result, list), f"returned {result!r} for {piece!r}"
        assert all(isinstance(part, bytes) and part for part in result), result
        out.extend(result)
    return b"".join(out)


def new_meter(drop: bool, encoding: str = "identity") -> StreamMeter:
    return StreamMeter(OpenAIChat(MODEL), make_decoder(encoding), drop_usage_event=drop)


def assert_metered(meter: StreamMeter) -> None:
    assert meter.dialect.usage == EXPECTED_USAGE
    assert meter.dialect.reply == EXPECTED_REPLY


def cuts(data: bytes, rng: random.Random) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)])]


def test_the_stream_looks_like_the_real_api():
    assert PLAIN.startswith(b'data: {"id":"chatcmpl-')
    assert PLAIN.endswith(b"data: [DONE]\n\n")
    assert USAGE_EVENT.startswith(b'data: {"id":"' + RESPONSE_ID.encode())
    assert b'"choices":[],"usage":{"prompt_tokens":1187' in USAGE_EVENT
    assert PLAIN.count(b'"usage":null') == len(WORDS) + 2


@pytest.mark.parametrize("drop", [False, True], ids=["passthrough", "drop-usage"])
@pytest.mark.parametrize("stream, usage_event", [(PLAIN, USAGE_EVENT), (CRLF, CRLF_USAGE_EVENT)], ids=["lf", "crlf"])
def test_one_chunk(stream, usage_event, drop):
    meter = new_meter(drop)
    out = feed(meter, [stream])
    assert out == (without(stream, usage_event) if drop else stream)
    assert_metered(meter)


@pytest.mark.parametrize("drop", [False, True], ids=["passthrough", "drop-usage"])
@pytest.mark.parametrize("stream, usage_event", [(PLAIN, USAGE_EVENT), (CRLF, CRLF_USAGE_EVENT)], ids=["lf", "crlf"])
def test_one_event_per_chunk_as_providers_send_them(stream, usage_event, drop):
    newline = b"\r\n\r\n" if stream is CRLF else b"\n\n"
    events = [event + newline for event in stream.split(newline)[:-1]]
    assert b"".join(events) == stream
    meter = new_meter(drop)
    assert feed(meter, events) == (without(stream, usage_event) if drop else stream)
    assert_metered(meter)


def test_the_text_of_a_cut_stream_is_decoded_from_its_json_strings_for_the_estimate():
    """Streamed text is kept as it came, escapes and all, and decoded only for an estimate."""
    words = ["caf\u00e9", ' "quoted"', "\n", " \\ back", " 日本"]
    cut_before_usage = openai_stream(words)[0].split(b'"choices":[]')[0]
    meter = new_meter(drop=True)
    feed(meter, [cut_before_usage])
    assert meter.dialect.usage is None
    assert meter.dialect.text.total() == text_tokens('café "quoted"\n \\ back 日本', MODEL)


@pytest.mark.parametrize("drop", [True, False])
def test_chunks_of_several_whole_events_are_read_at_once_and_counted_exactly(drop):
    """Once the reply is identified, a chunk of whole events none of which can carry usage is
    metered in one piece: the text of a cut stream counts as it does event by event, and the
    usage event, when it comes among others, is still read (and dropped when asked)."""
    words = [f" w{i}" for i in range(30)]
    stream, usage_event = openai_stream(words)
    events = [event + b"\n\n" for event in stream.split(b"\n\n")[:-1]]
    pieces = [events[0]] + [b"".join(events[i : i + 3]) for i in range(1, len(events), 3)]
    cut = [piece for piece in pieces if b'"choices":[]' not in piece and b"[DONE]" not in piece]
    meter = new_meter(drop)
    assert feed(meter, cut) == b"".join(cut)
    assert meter.dialect.usage is None
    assert meter.dialect.text.total() == text_tokens("".join(words), MODEL)
    whole = new_meter(drop)
    assert feed(whole, pieces) == (without(stream, usage_event) if drop else stream)
    assert whole.dialect.usage == openai_usage(USAGE)


def test_reasoning_shown_before_the_answer_counts_for_the_estimate():
    """DeepSeek and xAI stream their reasoning in `reasoning_content`, vLLM-style servers in
    `reasoning`: output the provider bills, so a cut stream's estimate counts it."""
    thoughts = [
        {"index": 0, "delta": {"content": None, key: piece}, "finish_reason": None}
        for key, piece in (("reasoning_content", "Let me"), ("reasoning", " think."))
    ]
    events = [sse(chunk(delta(role="assistant"))), *(sse(chunk([t])) for t in thoughts), sse(chunk(delta("Yes.")))]
    meter = new_meter(drop=True)
    feed(meter, events)
    assert meter.dialect.usage is None
    assert meter.dialect.text.total() == text_tokens("Let me think.Yes.", MODEL)


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_in_a_reply_without_usage_counts_for_the_estimate(key):
    dialect = OpenAIChat(MODEL)
    dialect.read_body({"choices": [{"message": {"role": "assistant", key: "Let me think.", "content": "Yes."}}]})
    assert dialect.text.total() == text_tokens("Let me think.Yes.", MODEL)


def test_a_responses_reasoning_summary_without_usage_counts_for_the_estimate():
    dialect = OpenAIResponses(MODEL)
    summary = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Let me think."}]}
    answer = {"type": "message", "content": [{"type": "output_text", "text": "Yes."}]}
    dialect.read_body({"id": "resp_1", "output": [summary, answer]})
    assert dialect.text.total() == text_tokens("Let me think.Yes.", MODEL)


def test_malformed_escapes_in_streamed_text_count_as_no_text():
    counter = TextCounter(MODEL)
    for piece in (b"one", b"bad \\x escape", b"two"):
        counter.add(piece)
    assert counter.total() == text_tokens("onetwo", MODEL)


def test_an_estimated_prompt_counts_tool_calls_and_results_of_every_wire_format():
    result = "Sunny, 21 degrees, light wind from the west. " * 20
    anthropic = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": result}]},
    ]
    gemini = [
        {"role": "user", "parts": [{"text": "Weather in Oslo?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"report": result}}}]},
    ]
    called = text_tokens('{"city":"Oslo"}', None)
    assert Anthropic("m").prompt_tokens({"messages": anthropic}) >= text_tokens(result, None) + called
    google = dialect_for(Wire.GOOGLE, "/v1beta/models/m:generateContent", "m")
    assert google.prompt_tokens({"contents": gemini}) >= text_tokens(result, None) + called
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K" * 1000}}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    assert Anthropic("m").prompt_tokens({"messages": with_image}) < 30  # an image's data is no text


def test_a_stream_event_the_meter_cannot_read_leaves_the_stream_passing_unmetered(caplog):
    meter = StreamMeter(dialect_for(Wire.GOOGLE, "/v1beta/models/m:streamGenerateContent", "m"), bytes, False)
    odd = b'data: {"candidates": 5}\r\n\r\n'  # a list where a provider sends a number
    assert meter(odd) == [odd] and not meter.readable
    assert meter(b'data: {"candidates": []}\r\n\r\n') == [b'data: {"candidates": []}\r\n\r\n']
    assert "stream stopped being read" in caplog.text


def test_text_past_the_limit_is_not_kept_and_is_estimated_from_the_text_kept():
    words = [f"word{i % 10} \\u00e9t\\u00e9, ".encode() for i in range(400)]
    counter = TextCounter(MODEL, limit=1000)
    for word in words:
        counter.add(word)
    assert len(counter._parts) == -(-1000 // len(words[0]))  # what came after was only measured
    whole = text_tokens("".join(f"word{i % 10} été, " for i in range(400)), MODEL)
    assert counter.total() == pytest.approx(whole, rel=0.01)


def test_stream_events_are_held_raw_only_a_batch_at_a_time_and_their_text_is_counted_exactly():
    """A stream's events are kept as they came until RAW_BATCH bytes of them have gathered;
    then only the text in them is kept."""
    words = [f" word{i % 10} \u00e9t\u00e9," for i in range(2000)]
    stream, _ = openai_stream(words)
    meter = new_meter(drop=True)
    counter = meter.dialect.text
    for event in stream.split(b'"choices":[]')[0].split(b"\n\n")[:-1]:  # cut before the usage event
        meter(event + b"\n\n")
        assert sum(map(len, counter._raw)) < RAW_BATCH + len(event)
    assert sum(map(len, counter._parts)) <= len(json.dumps("".join(words)))  # the text alone, not the events
    assert meter.dialect.usage is None
    assert counter.total() == text_tokens("".join(words), MODEL)


def test_stream_events_past_the_limit_are_not_kept_and_their_text_is_estimated_from_the_text_kept():
    """Past the limit, only the size of the events is noted."""
    words = [f" word{i % 10} \u00e9t\u00e9," for i in range(5000)]
    stream, _ = openai_stream(words)
    meter = new_meter(drop=True)
    meter.dialect.text.limit = 5_000
    feed(meter, [stream.split(b'"choices":[]')[0]])  # cut before the usage event
    assert meter.dialect.usage is None
    assert 5_000 <= meter.dialect.text._kept < 5_000 + RAW_BATCH / 10  # one batch of events holds little text
    assert meter.dialect.text.total() == pytest.approx(text_tokens("".join(words), MODEL), rel=0.02)


def anthropic_events(words: list[str]) -> list[dict]:
    start = {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": []}
    start["usage"] = {"input_tokens": 25, "output_tokens": 1}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *[{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}} for w in words],
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]


def responses_events(words: list[str]) -> list[dict]:
    response = {"id": "resp_01", "object": "response", "model": MODEL, "error": None, "usage": None}
    done = {**response, "usage": {"input_tokens": 12, "output_tokens": 9, "total_tokens": 21}}
    return [
        {"type": "response.created", "response": response},
        *[{"type": "response.output_text.delta", "item_id": "msg_1", "delta": w} for w in words],
        {"type": "response.output_text.done", "item_id": "msg_1", "text": "".join(words)},
        {"type": "response.completed", "response": done},
    ]


@pytest.mark.parametrize(
    "make_dialect, events, parsed",
    [
        (lambda: Anthropic("claude-sonnet-4-5"), anthropic_events(WORDS), ["message_start", "message_delta"]),
        (lambda: OpenAIResponses(MODEL), responses_events(WORDS), ["response.created", "response.completed"]),
        (lambda: OpenAIChat(MODEL), [json.loads(e[6:]) for e in PLAIN.split(b"\n\n")[:-2]], ["first chunk", "usage"]),
    ],
    ids=["anthropic", "responses", "chat"],
)
def test_only_stream_events_that_can_carry_usage_are_parsed_and_the_text_of_the_others_is_kept_raw(
    make_dialect, events, parsed, monkeypatch
):
    dialect, seen = make_dialect(), []  # a new one each run: a dialect keeps the text it has seen
    monkeypatch.setattr(dialects, "_json", lambda data: seen.append(json.loads(data)) or seen[-1])
    meter = StreamMeter(dialect, make_decoder("identity"), drop_usage_event=False)
    feed(meter, [sse(event) for event in events])
    names = [event.get("type") or ("usage" if event["usage"] else "first chunk") for event in seen]
    assert names == parsed
    assert meter.dialect.reported
    assert meter.dialect.text.total() == text_tokens("".join(WORDS), dialect.model)


def test_text_within_the_limit_is_counted_exactly():
    counter = TextCounter(MODEL, limit=1000)
    for piece in ("Hello", b" w\\u00f6rld", "!"):
        counter.add(piece)
    assert counter.total() == text_tokens("Hello wörld!", MODEL)


@pytest.mark.parametrize("drop", [False, True], ids=["passthrough", "drop-usage"])
@pytest.mark.parametrize("stream, usage_event", [(PLAIN, USAGE_EVENT), (CRLF, CRLF_USAGE_EVENT)], ids=["lf", "crlf"])
def test_split_at_every_byte_boundary(stream, usage_event, drop):
    expected = without(stream, usage_event) if drop else stream
    for at in range(1, len(stream)):
        meter = new_meter(drop)
        assert feed(meter, [stream[:at], stream[at:]]) == expected, f"split at {at}"
        assert_metered(meter)


@pytest.mark.parametrize("drop", [False, True], ids=["passthrough", "drop-usage"])
@pytest.mark.parametrize("stream, usage_event", [(PLAIN, USAGE_EVENT), (CRLF, CRLF_USAGE_EVENT)], ids=["lf", "crlf"])
def test_random_splits(stream, usage_event, drop):
    rng = random.Random(20250101)
    expected = without(stream, usage_event) if drop else stream
    for _ in range(200):
        meter = new_meter(drop)
        assert feed(meter, cuts(stream, rng)) == expected
        assert_metered(meter)


def test_byte_by_byte():
    meter = new_meter(drop=True)
    assert feed(meter, [PLAIN[i : i + 1] for i in range(len(PLAIN))]) == without(PLAIN, USAGE_EVENT)
    assert_metered(meter)


COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}
STREAM_ENCODINGS = list(COMPRESSORS)


@pytest.mark.parametrize("encoding", STREAM_ENCODINGS)
def test_compressed_stream_passes_through_unchanged_and_is_metered(encoding):
    compressed = COMPRESSORS[encoding](PLAIN)
    rng = random.Random(7)
    for _ in range(50):
        meter = new_meter(drop=False, encoding=encoding)
        assert feed(meter, cuts(compressed, rng)) == compressed
        assert_metered(meter)


def test_gzip_stream_split_at_every_byte_boundary_passes_through():
    compressed = gzip.compress(PLAIN)
    for at in range(1, len(compressed)):
        meter = new_meter(drop=False, encoding="gzip")
        assert feed(meter, [compressed[:at], compressed[at:]]) == compressed, f"split at {at}"
        assert_metered(meter)


@pytest.mark.parametrize("encoding", STREAM_ENCODINGS)
def test_compressed_stream_with_drop_hands_on_decoded_events_without_the_usage_event(encoding):
    compressed = COMPRESSORS[encoding](PLAIN)
    rng = random.Random(11)
    for _ in range(50):
        meter = new_meter(drop=True, encoding=encoding)
        assert feed(meter, cuts(compressed, rng)) == without(PLAIN, USAGE_EVENT)
        assert_metered(meter)


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_undecodable_bytes_still_pass_through_when_nothing_is_dropped(encoding):
    meter = new_meter(drop=False, encoding=encoding)
    assert feed(meter, [PLAIN]) == PLAIN
    assert meter.dialect.usage is None


def test_an_incomplete_event_returns_an_empty_list_never_empty_bytes():
    meter = new_meter(drop=True)
    assert meter(b'data: {"id":"chatcmpl-') == []
    assert meter(b"\n") == []
    assert meter(b"\n") == [b'data: {"id":"chatcmpl-\n\n']


def test_the_usage_event_alone_returns_an_empty_list():
    meter = new_meter(drop=True)
    assert meter(USAGE_EVENT) == []
    assert meter.dialect.usage == EXPECTED_USAGE


def test_end_of_stream_flushes_an_unterminated_last_event_as_it_came():
    meter = new_meter(drop=True)
    assert meter(b"data: [DONE]") == []
    assert meter(b"") == [b"data: [DONE]"]
    assert meter(b"") == []


def test_a_usage_chunk_that_also_carries_content_is_not_dropped():
    # some OpenAI-compatible providers put usage on the last content chunk
    last = sse(chunk(delta("!", finish="stop"), USAGE))
    stream = sse(chunk(delta("Hi"))) + last + sse(b"[DONE]")
    meter = new_meter(drop=True)
    assert feed(meter, [stream]) == stream
    assert_metered(meter)


def test_cumulative_usage_events_replace_the_running_figures():
    first = sse(chunk([], {"prompt_tokens": 10, "completion_tokens": 1}))
    last = sse(chunk([], {"prompt_tokens": 10, "completion_tokens": 4}))
    meter = new_meter(drop=False)
    feed(meter, [sse(chunk(delta("a"))) + first + last])
    assert meter.dialect.usage == Usage(input_tokens=10, output_tokens=4)


def test_a_stream_without_usage_meters_none_and_passes_unchanged():
    stream = sse(chunk(delta("Hi"))) + sse(b"[DONE]")
    meter = new_meter(drop=True)
    assert feed(meter, [stream]) == stream
    assert meter.dialect.usage is None
    assert meter.dialect.reply == EXPECTED_REPLY


def test_comments_and_non_json_events_pass_through():
    stream = b": keep-alive\n\n" + b"event: ping\ndata: not json\n\n" + PLAIN
    meter = new_meter(drop=True)
    assert feed(meter, [stream]) == without(stream, USAGE_EVENT)
    assert_metered(meter)


@pytest.mark.parametrize("drop", [False, True], ids=["passthrough", "drop-usage"])
def test_pending_buffer_stays_within_one_event_over_a_long_stream(drop):
    words = [f" word{i}" for i in range(3000)]
    stream, _ = openai_stream(words)
    largest_event = max(len(event) + 2 for event in stream.split(b"\n\n"))
    meter = new_meter(drop)
    largest_pending = 0
    for start in range(0, len(stream), 61):
        meter(stream[start : start + 61])
        largest_pending = max(largest_pending, len(meter._pending))
    meter(b"")
    assert 0 < largest_pending < largest_event
    assert meter._pending == b""
    assert_metered(meter)


# --- make_decoder -----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "br", "zstd", " GZIP ", "Br"])
def test_make_decoder_decodes_incrementally(encoding):
    compressor = COMPRESSORS.get(encoding.strip().lower(), gzip.compress)
    compressed = compressor(PLAIN)
    decode = make_decoder(encoding)
    decoded = b"".join(decode(compressed[i : i + 5]) for i in range(0, len(compressed), 5))
    assert decoded == PLAIN


def test_deflate_decoder_also_reads_gzip_framing():
    assert make_decoder("deflate")(gzip.compress(PLAIN)) == PLAIN


def test_a_streaming_zstd_frame_decodes_incrementally():
    compressor = zstandard.ZstdCompressor().compressobj()
    compressed = compressor.compress(PLAIN) + compressor.flush()
    decode = make_decoder("zstd")
    assert b"".join(decode(compressed[i : i + 3]) for i in range(0, len(compressed), 3)) == PLAIN


def test_zstd_decoder_accepts_the_end_of_stream_call():
    decode = make_decoder("zstd")
    assert decode(COMPRESSORS["zstd"](PLAIN)) == PLAIN
    assert decode(b"") == b""


def test_zstd_decoder_reads_every_frame():
    first, second = PLAIN[:500], PLAIN[500:]
    compressed = COMPRESSORS["zstd"](first) + COMPRESSORS["zstd"](second)
    assert make_decoder("zstd")(compressed) == PLAIN


@pytest.mark.parametrize("encoding", ["", "identity", "IDENTITY"])
def test_identity_decoder_returns_the_bytes(encoding):
    assert make_decoder(encoding)(b"data: x\n\n") == b"data: x\n\n"


@pytest.mark.parametrize("encoding", ["compress", "gzip, br", "snappy", "lz4"])
def test_unknown_encodings_are_a_value_error(encoding):
    with pytest.raises(ValueError, match="unsupported content-encoding"):
        make_decoder(encoding)


# --- every figure and every piece of text each wire format gives (docs/mutation.md) ---------------

GEMINI = "gemini-2.5-flash"


def test_gemini_usage_metadata_gives_every_figure():
    metadata = {
        "promptTokenCount": 100,
        "toolUsePromptTokenCount": 20,
        "candidatesTokenCount": 30,
        "thoughtsTokenCount": 7,
        "cachedContentTokenCount": 40,
        "totalTokenCount": 157,
    }
    expected = Usage(input_tokens=120, output_tokens=37, cached_input_tokens=40, reasoning_tokens=7)
    assert dialects.google_usage(metadata) == expected
    assert dialects.google_usage({"promptTokenCount": 9}) == Usage(input_tokens=9)


def gemini_chunks(usage: bool = True) -> list[dict]:
    chunks = [
        {
            "responseId": "resp-1",
            "modelVersion": "gemini-2.5-flash-001",
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]}}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1},
        },
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": " world, twice"}]}}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 4},
        },
    ]
    return chunks if usage else [{k: v for k, v in chunk.items() if k != "usageMetadata"} for chunk in chunks]


@pytest.mark.parametrize("how", ["body", "array", "events"])
def test_a_gemini_answer_gives_its_identity_and_last_usage_however_it_comes(how):
    dialect = dialect_for(Wire.GOOGLE, f"/v1beta/models/{GEMINI}:generateContent", GEMINI)
    chunks = gemini_chunks()
    if how == "body":
        dialect.read_body({**chunks[0], "usageMetadata": chunks[1]["usageMetadata"]})
    elif how == "array":
        dialect.read_body(chunks)
    else:
        assert [dialect.read_event(json.dumps(chunk).encode()) for chunk in chunks] == [False, False]
    assert dialect.reply == Reply("resp-1", "gemini-2.5-flash-001", None)
    assert dialect.reported and dialect.metered_usage({}) == Usage(input_tokens=5, output_tokens=4)


def test_a_gemini_answer_without_usage_is_estimated_from_the_text_of_its_candidates():
    dialect = dialect_for(Wire.GOOGLE, f"/v1beta/models/{GEMINI}:generateContent", GEMINI)
    dialect.read_body(gemini_chunks(usage=False))
    request = {"contents": [{"role": "user", "parts": [{"text": "say hello"}]}], "systemInstruction": "be brief"}
    estimate = dialect.metered_usage(request)
    assert estimate.output_tokens == text_tokens("Hello world, twice", GEMINI)
    assert estimate.input_tokens == chat_prompt_tokens(request["contents"], GEMINI, "be brief") > 0
    assert estimate.source is UsageSource.ESTIMATED


def test_a_gemini_error_body_gives_its_message():
    dialect = dialect_for(Wire.GOOGLE, f"/v1beta/models/{GEMINI}:generateContent", GEMINI)
    dialect.read_body(
        {"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}
    )
    assert dialect.reply == Reply(None, None, "Resource has been exhausted") and not dialect.reported


CLAUDE = "claude-sonnet-4-5"


def test_an_anthropic_body_gives_its_identity_and_usage_or_else_the_text_of_its_blocks():
    usage = {"input_tokens": 10, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2, "output_tokens": 6}
    body = {
        "id": "msg_1",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "thinking", "thinking": "Let me think"}, {"type": "text", "text": "Hello there"}],
        "usage": usage,
    }
    dialect = dialect_for(Wire.ANTHROPIC, "/v1/messages", CLAUDE)
    dialect.read_body(body)
    assert dialect.reply == Reply("msg_1", "claude-sonnet-4-5-20250929", None)
    assert dialect.metered_usage({}) == Usage(
        input_tokens=16, output_tokens=6, cached_input_tokens=4, cache_write_tokens=2
    )
    bare = dialect_for(Wire.ANTHROPIC, "/v1/messages", CLAUDE)
    bare.read_body({key: value for key, value in body.items() if key != "usage"})
    request = {"system": "be brief", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    estimate = bare.metered_usage(request)
    assert estimate.output_tokens == text_tokens("Let me thinkHello there", CLAUDE)
    assert estimate.input_tokens == chat_prompt_tokens(request["messages"], CLAUDE, "be brief")
    assert bare.max_output_tokens(request) == 9 and bare.max_output_tokens({}) is None


def test_an_anthropic_stream_is_final_only_at_message_delta_and_reads_its_error_event():
    dialect = dialect_for(Wire.ANTHROPIC, "/v1/messages", CLAUDE)
    start = {"id": "msg_2", "model": "claude-x", "usage": {"input_tokens": 12, "output_tokens": 1}}
    assert dialect.read_event(json.dumps({"type": "message_start", "message": start}).encode()) is False
    assert dialect.reply == Reply("msg_2", "claude-x", None)
    assert dialect.usage == Usage(input_tokens=12, output_tokens=1) and not dialect.reported
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    dialect.read_event(json.dumps(error).encode())
    assert dialect.reply.error == "Overloaded" and not dialect.reported
    dialect.read_event(json.dumps({"type": "message_delta", "usage": {"output_tokens": 3}}).encode())
    assert dialect.reported and dialect.metered_usage({}) == Usage(input_tokens=12, output_tokens=3)


RESPONSES_TOOLS = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Unbelievably, the quarterly reconciliation über-report — naïve façade 東京",
        "parameters": {"type": "object"},
    }
]


@pytest.mark.parametrize(
    "request_body",
    [
        {"input": "What is the balance", "instructions": "Answer in one line", "tools": RESPONSES_TOOLS},
        {"input": [{"role": "user", "content": "What is the balance"}], "instructions": "Answer in one line"},
        {"input": [{"role": "user", "content": "What is the balance"}], "tools": RESPONSES_TOOLS},
    ],
    ids=["text", "messages-and-instructions", "messages-and-tools"],
)
def test_a_responses_prompt_counts_its_input_instructions_and_tools(request_body):
    model = "gpt-4o-mini"
    dialect = dialect_for(Wire.OPENAI, "/v1/responses", model)
    tools = tools_tokens(request_body.get("tools"), model)
    if isinstance(request_body["input"], str):
        expected = text_tokens(request_body["input"], model) + text_tokens(request_body["instructions"], model) + tools
    else:
        expected = chat_prompt_tokens(request_body["input"], model, request_body.get("instructions")) + tools
    assert dialect.prompt_tokens(request_body) == expected > 0
    assert dialect.max_output_tokens({**request_body, "max_output_tokens": 50}) == 50


def test_a_responses_body_gives_its_identity_and_usage_or_else_the_text_of_its_output():
    output = [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Thinking it over"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "The balance is 4"}]},
    ]
    body = {"id": "resp_1", "model": "gpt-4o-mini-2024-07-18", "output": output, "error": None}
    usage = {"input_tokens": 8, "output_tokens": 5, "total_tokens": 13}
    dialect = dialect_for(Wire.OPENAI, "/v1/responses", "gpt-4o-mini")
    dialect.read_body({**body, "usage": usage})
    assert dialect.reply == Reply("resp_1", "gpt-4o-mini-2024-07-18", None)
    assert dialect.metered_usage({}) == Usage(input_tokens=8, output_tokens=5)
    bare = dialect_for(Wire.OPENAI, "/v1/responses", "gpt-4o-mini")
    bare.read_body(body)
    assert bare.metered_usage({"input": "hi"}).output_tokens == text_tokens(
        "Thinking it overThe balance is 4", "gpt-4o-mini"
    )
    failed = dialect_for(Wire.OPENAI, "/v1/responses", "gpt-4o-mini")
    failed.read_event(
        json.dumps({"type": "response.failed", "response": {**body, "error": {"message": "boom"}}}).encode()
    )
    assert failed.reply == Reply("resp_1", "gpt-4o-mini-2024-07-18", "boom") and not failed.reported


@pytest.mark.parametrize(
    "request_body, pieces",
    [
        ({"prompt": "Once upon a time"}, ["Once upon a time"]),
        ({"prompt": ["first prompt", "second prompt", 7]}, ["first prompt", "second prompt"]),
        ({"input": ["embed this", "and this"]}, ["embed this", "and this"]),
    ],
    ids=["completion", "completions", "embeddings"],
)
def test_an_openai_prompt_without_messages_counts_every_string(request_body, pieces):
    model = "gpt-4o-mini"
    dialect = dialect_for(Wire.OPENAI, "/v1/completions", model)
    assert dialect.prompt_tokens(request_body) == sum(text_tokens(piece, model) for piece in pieces)


def test_an_openai_chat_body_without_usage_is_estimated_from_all_of_its_text():
    model = "deepseek-reasoner"
    call = {"function": {"name": "lookup", "arguments": '{"account": 42}'}}
    body = {
        "id": "chatcmpl-1",
        "model": model,
        "choices": [
            {"message": {"reasoning_content": "Thinking. ", "content": "Here you are", "tool_calls": [call]}},
            {"text": " and more"},
        ],
    }
    dialect = dialect_for(Wire.OPENAI, "/v1/chat/completions", model)
    dialect.read_body(body)
    assert dialect.reply == Reply("chatcmpl-1", model, None) and not dialect.reported
    expected = text_tokens('Thinking. Here you are{"account": 42} and more', model)
    assert dialect.metered_usage({"messages": []}).output_tokens == expected
    with_usage = dialect_for(Wire.OPENAI, "/v1/chat/completions", model)
    with_usage.read_body({**body, "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    assert with_usage.metered_usage({}) == Usage(input_tokens=3, output_tokens=4)


OLD_ENCODING_TEXT = "Unbelievably, the quarterly reconciliation über-report — naïve façade 東京"


@pytest.mark.parametrize(
    "wire, path",
    [
        (Wire.OPENAI, "/v1/chat/completions"),
        (Wire.OPENAI, "/v1/responses"),
        (Wire.OPENAI, "/v1/audio/speech"),
        (Wire.OPENAI, "/v1/responses/input_tokens"),
        (Wire.ANTHROPIC, "/v1/messages"),
        (Wire.GOOGLE, "/v1beta/models/m:generateContent"),
    ],
)
def test_every_dialect_counts_with_the_tokenizer_of_the_model_asked_for(wire, path):
    """gpt-4 uses cl100k_base, not the o200k_base of newer models: the count differs."""
    assert text_tokens(OLD_ENCODING_TEXT, "gpt-4") != text_tokens(OLD_ENCODING_TEXT, "gpt-4o")
    dialect = dialect_for(wire, path, "gpt-4")
    assert dialect.model == "gpt-4" and dialect.text.model == "gpt-4"


@pytest.mark.parametrize(
    "path, request_body, expected",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": OLD_ENCODING_TEXT}], "tools": RESPONSES_TOOLS},
            lambda: (
                chat_prompt_tokens([{"role": "user", "content": OLD_ENCODING_TEXT}], "gpt-4")
                + tools_tokens(RESPONSES_TOOLS, "gpt-4")
            ),
        ),
        ("/v1/completions", {"prompt": OLD_ENCODING_TEXT}, lambda: text_tokens(OLD_ENCODING_TEXT, "gpt-4")),
        (
            "/v1/responses",
            {"input": OLD_ENCODING_TEXT, "tools": RESPONSES_TOOLS},
            lambda: text_tokens(OLD_ENCODING_TEXT, "gpt-4") + tools_tokens(RESPONSES_TOOLS, "gpt-4"),
        ),
    ],
    ids=["chat", "completions", "responses"],
)
def test_a_prompt_and_an_answer_are_estimated_with_the_models_tokenizer(path, request_body, expected):
    dialect = dialect_for(Wire.OPENAI, path, "gpt-4")
    assert dialect.prompt_tokens(request_body) == expected()
    dialect.read_body({"choices": [{"message": {"content": OLD_ENCODING_TEXT}}]})
    if path != "/v1/responses":
        assert dialect.metered_usage(request_body).output_tokens == text_tokens(OLD_ENCODING_TEXT, "gpt-4")


def test_an_error_in_a_chat_stream_or_an_anthropic_body_is_read():
    chat = dialect_for(Wire.OPENAI, "/v1/chat/completions", "gpt-4o-mini")
    chat.read_event(b'{"id": "chatcmpl-9", "error": {"message": "The server had an error"}}')
    assert chat.reply == Reply("chatcmpl-9", None, "The server had an error")
    claude = dialect_for(Wire.ANTHROPIC, "/v1/messages", CLAUDE)
    claude.read_body({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert claude.reply == Reply(None, None, "Overloaded")


def test_blocks_and_parts_without_text_add_no_text():
    claude = dialect_for(Wire.ANTHROPIC, "/v1/messages", CLAUDE)
    claude.read_body({"content": [{"type": "tool_use", "id": "t1", "input": {}}, {"type": "text", "text": "ok"}]})
    responses = dialect_for(Wire.OPENAI, "/v1/responses", "gpt-4o-mini")
    responses.read_body(
        {"output": [{"type": "message", "content": [{"type": "output_audio"}, "junk", {"text": "ok"}]}]}
    )
    assert claude.text.total() == responses.text.total() == text_tokens("ok", "gpt-4o-mini")


@pytest.mark.parametrize(
    "wire, path, body",
    [
        (Wire.GOOGLE, "/v1beta/models/m:generateContent", {"candidates": [1, "two", None]}),
        (Wire.OPENAI, "/v1/chat/completions", {"choices": ["junk", 3, {"message": "junk"}]}),
        (Wire.OPENAI, "/v1/responses", {"output": ["junk", 3]}),
    ],
)
def test_answers_of_the_wrong_shape_are_read_as_no_text(wire, path, body):
    dialect = dialect_for(wire, path, "gpt-4o-mini")
    dialect.read_body(body)
    assert dialect.text.total() == 0 and not dialect.reported


def test_limits_of_the_wrong_shape_are_no_limit_and_embeddings_have_no_output():
    gemini = dialect_for(Wire.GOOGLE, "/v1beta/models/m:generateContent", "m")
    assert gemini.max_output_tokens({"generationConfig": "maxOutputTokens=5"}) is None
    chat = dialect_for(Wire.OPENAI, "/v1/embeddings", "text-embedding-3-small")
    assert chat.max_output_tokens({"input": "embed me"}) == 0
    assert chat.worst_case({"messages": []}, 100) is None  # no limit: the product's cap is held


def test_an_anthropic_stream_cut_after_message_start_keeps_its_cache_figures_in_the_estimate():
    dialect = dialect_for(Wire.ANTHROPIC, "/v1/messages", CLAUDE)
    start = {"id": "msg_3", "model": CLAUDE, "usage": {**ANTHROPIC_START}}
    dialect.read_event(json.dumps({"type": "message_start", "message": start}).encode())
    dialect.read_event(b'{"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Half an answ"}}')
    estimate = dialect.metered_usage({"messages": []})
    assert (estimate.input_tokens, estimate.cached_input_tokens, estimate.cache_write_tokens) == (710, 400, 300)
    assert estimate.output_tokens == text_tokens("Half an answ", CLAUDE) and estimate.source is UsageSource.ESTIMATED


def test_speech_holds_the_characters_of_its_input_and_ignores_an_event_without_usage():
    speech = dialect_for(Wire.OPENAI, "/v1/audio/speech", "tts-1")
    assert speech.worst_case({"model": "tts-1", "input": "Hello"}, 40) == Usage(input_characters=5)
    assert speech.read_event(b'{"type": "speech.audio.done"}') is False and not speech.reported
