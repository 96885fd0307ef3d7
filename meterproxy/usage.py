"""Usage figures and their extraction from provider responses, as plain functions over dicts.

Token figures follow OpenAI's convention whatever the provider (SPEC §6): `input_tokens`
counts every input token (cached and cache-write ones are parts of it) and `output_tokens`
includes reasoning tokens.
"""

import dataclasses
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

    def columns(self) -> dict:
        """The ledger columns, seconds as exact decimal strings."""
        values = dataclasses.asdict(self)
        values["usage_source"] = values.pop("source").value
        values["input_seconds"] = str(self.input_seconds)
        values["output_seconds"] = str(self.output_seconds)
        return values


@dataclass
class Reply:
    """What a response tells about itself besides usage."""

    response_id: str | None = None
    model: str | None = None
    error: str | None = None  # the provider's own error message, if it sent one


def _count(value: object) -> int:
    """A token count as sent by a provider; anything else (null, missing, garbage) is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def openai_usage(usage: dict) -> Usage:
    """Chat completions, completions, embeddings and the Responses API, plus the
    OpenAI-compatible providers' variants (DeepSeek's `prompt_cache_hit_tokens`)."""
    input_tokens = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = _count(details.get("cached_tokens")) or _count(usage.get("prompt_cache_hit_tokens"))
    output_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return Usage(
        input_tokens=input_tokens,
        output_tokens=_count(usage.get("completion_tokens", usage.get("output_tokens"))),
        cached_input_tokens=cached,
        reasoning_tokens=_count(output_details.get("reasoning_tokens")),
    )


def openai_reply(body: dict) -> tuple[Usage | None, Reply]:
    """Usage and identity of one OpenAI-format JSON body or stream chunk."""
    usage = body.get("usage")
    error = body.get("error")
    message = _text(error.get("message")) if isinstance(error, dict) else None
    reply = Reply(_text(body.get("id")), _text(body.get("model")), message)
    return (openai_usage(usage) if isinstance(usage, dict) else None), reply


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
