"""Usage figures and their extraction from each provider's usage objects, as plain functions.

Token figures follow OpenAI's convention whatever the provider (SPEC §6): `input_tokens`
counts every input token (cached and cache-write ones are parts of it) and `output_tokens`
includes reasoning tokens. These are also genai-prices' conventions.
"""

import enum
from dataclasses import dataclass
from decimal import Decimal


class UsageSource(str, enum.Enum):
    PROVIDER = "provider"
    ESTIMATED = "estimated"


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    input_characters: int = 0
    output_characters: int = 0
    input_seconds: Decimal = Decimal(0)
    output_seconds: Decimal = Decimal(0)
    source: UsageSource = UsageSource.PROVIDER
    # Parts priced apart, which the ledger row does not break down: cache writes kept an hour
    # (Anthropic), and audio tokens among the input and output ones.
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0

    def columns(self) -> dict:
        """The ledger columns, seconds as exact decimal strings."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "input_characters": self.input_characters,
            "output_characters": self.output_characters,
            "input_seconds": str(self.input_seconds),
            "output_seconds": str(self.output_seconds),
            "usage_source": self.source.value,
        }


@dataclass
class Reply:
    """What a response tells about itself besides usage."""

    response_id: str | None = None
    model: str | None = None
    error: str | None = None  # the provider's own error message, if it sent one


def count(value: object) -> int:
    """A token count as sent by a provider; anything else (null, missing, garbage) is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _object(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def openai_usage(usage: dict) -> Usage:
    """Chat completions, completions, embeddings and the Responses API, plus the
    OpenAI-compatible providers' variants: DeepSeek's `prompt_cache_hit_tokens`, and xAI's
    reasoning tokens, which it counts apart from the completion tokens (its total has both)
    where OpenAI counts them within."""
    details = _object(usage.get("prompt_tokens_details") or usage.get("input_tokens_details"))
    output_details = _object(usage.get("completion_tokens_details") or usage.get("output_tokens_details"))
    prompt = count(usage.get("prompt_tokens", usage.get("input_tokens")))
    output = count(usage.get("completion_tokens", usage.get("output_tokens")))
    reasoning = count(output_details.get("reasoning_tokens"))
    if reasoning and count(usage.get("total_tokens")) == prompt + output + reasoning:
        output += reasoning
    return Usage(
        input_tokens=prompt,
        output_tokens=output,
        cached_input_tokens=count(details.get("cached_tokens")) or count(usage.get("prompt_cache_hit_tokens")),
        reasoning_tokens=reasoning,
        input_audio_tokens=count(details.get("audio_tokens")),
        output_audio_tokens=count(output_details.get("audio_tokens")),
    )


def anthropic_usage(usage: dict, previous: Usage | None = None) -> Usage:
    """Anthropic counts cache reads and writes apart from `input_tokens`. A `message_delta`
    repeats cumulative figures, only some of them: the ones it has replace, the rest stay."""
    previous = previous or Usage()

    def figure(key: str, otherwise: int) -> int:
        return count(usage[key]) if key in usage else otherwise

    read = figure("cache_read_input_tokens", previous.cached_input_tokens)
    write = figure("cache_creation_input_tokens", previous.cache_write_tokens)
    kept_an_hour = (
        count(usage["cache_creation"].get("ephemeral_1h_input_tokens"))
        if isinstance(usage.get("cache_creation"), dict)
        else previous.cache_write_1h_tokens
    )
    uncached = figure(
        "input_tokens", previous.input_tokens - previous.cached_input_tokens - previous.cache_write_tokens
    )
    return Usage(
        input_tokens=uncached + read + write,
        output_tokens=figure("output_tokens", previous.output_tokens),
        cached_input_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(kept_an_hour, write),
    )


def google_usage(metadata: dict) -> Usage:
    """Gemini's `usageMetadata`: thoughts are output (and reasoning), tool-use prompts input;
    each side's tokens by modality tell its audio ones."""
    thoughts = count(metadata.get("thoughtsTokenCount"))
    return Usage(
        input_tokens=count(metadata.get("promptTokenCount")) + count(metadata.get("toolUsePromptTokenCount")),
        output_tokens=count(metadata.get("candidatesTokenCount")) + thoughts,
        cached_input_tokens=count(metadata.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
        input_audio_tokens=_audio(metadata.get("promptTokensDetails")),
        output_audio_tokens=_audio(metadata.get("candidatesTokensDetails")),
    )


def _audio(details: object) -> int:
    """The AUDIO entries of a Gemini list of tokens by modality."""
    entries = details if isinstance(details, list) else []
    return sum(count(entry.get("tokenCount")) for entry in entries if _object(entry).get("modality") == "AUDIO")


def error_message(body: dict) -> str | None:
    """`{"error": {"message": …}}` (OpenAI, Anthropic, Google all use this shape)."""
    return text(_object(body.get("error")).get("message"))
