"""Provider cost of one request: genai-prices, unless the override file prices the model.

The override file (`pricing/overrides.toml` by default) holds models genai-prices lacks and
negotiated prices, in dollars per million tokens. A model priced nowhere raises `PriceNotFound`
so that the request becomes an `error` row, never a silent zero.

genai-prices' general calculation takes about 70 µs, once per call. Most prices have no tiers,
and such a price is linear in the token figures: `LinearPrice` learns its coefficients from
genai-prices itself, once per price, and then prices a call with four multiplications, to the
same exact Decimal (`tests/test_pricing.py` checks every such model of the database).
"""

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import genai_prices
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import TieredPrices
from pydantic import BaseModel, ConfigDict

from meterproxy.usage import Usage

DEFAULT_OVERRIDES = Path(__file__).with_name("overrides.toml")
MILLION = Decimal(1_000_000)
MAX_REMEMBERED_NAMES = 10_000


class PriceNotFound(LookupError):
    pass


class UnitNotPriced(PriceNotFound):
    """The model has a price, but for none of the units used (speech characters for a model
    priced by the token, say): never a silent zero."""


class ModelPrice(BaseModel):
    """Dollars per million tokens; cache prices default to the input price."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    model: str
    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    cache_write_mtok: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        _require_units(usage, {"tokens"}, self.provider, self.model)
        cache_read = self.input_mtok if self.cache_read_mtok is None else self.cache_read_mtok
        cache_write = self.input_mtok if self.cache_write_mtok is None else self.cache_write_mtok
        uncached = max(0, usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens)
        total = (
            uncached * self.input_mtok
            + usage.cached_input_tokens * cache_read
            + usage.cache_write_tokens * cache_write
            + usage.output_tokens * self.output_mtok
        )
        return total / MILLION


TOKEN_FIGURES = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
PRICED_APART = ("cache_write_1h_tokens", "input_audio_tokens", "output_audio_tokens")  # genai-prices' names too


def price_figures(usage: Usage) -> dict[str, int]:
    """The usage as genai-prices names it."""
    figures = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
    }
    if usage.input_characters:  # text-to-speech is priced by the characters of its input
        figures["input_characters"] = usage.input_characters
    if usage.input_seconds or usage.output_seconds:  # transcription by the audio's length
        figures["audio_seconds"] = usage.input_seconds + usage.output_seconds
        figures["input_audio_seconds"] = usage.input_seconds
        figures["output_audio_seconds"] = usage.output_seconds
    for name in PRICED_APART:  # parts of the figures above, at prices of their own
        if getattr(usage, name):
            figures[name] = getattr(usage, name)
    return figures


@dataclass(frozen=True)
class LinearPrice:
    """A price without tiers, as a per-call constant plus one coefficient per token figure,
    valid for usage that genai-prices can price (cache tokens within the input tokens)."""

    constant: Decimal
    coefficients: tuple[Decimal, ...]

    # Probing point: every figure large and consistent, each raised by a million in turn.
    BASE = {
        "input_tokens": 4_000_000,
        "output_tokens": 1_000_000,
        "cache_read_tokens": 1_000_000,
        "cache_write_tokens": 1_000_000,
    }

    @classmethod
    def learn(cls, price: Callable[[dict], Decimal]) -> "LinearPrice | None":
        """From `price` (genai-prices' calculation), or None if it cannot price the probes."""
        try:
            base = price(cls.BASE)
            coefficients = tuple(
                (price({**cls.BASE, name: cls.BASE[name] + 1_000_000}) - base) / MILLION for name in TOKEN_FIGURES
            )
        except (LookupError, ValueError, TypeError):
            return None
        constant = base - sum(c * cls.BASE[name] for c, name in zip(coefficients, TOKEN_FIGURES))
        return cls(constant, coefficients)

    def cost(self, figures: dict[str, int]) -> Decimal | None:
        """None where the figures are outside what the coefficients were learnt for."""
        if len(figures) != len(TOKEN_FIGURES):
            return None
        values = [figures[name] for name in TOKEN_FIGURES]
        if min(values) < 0 or values[2] + values[3] > values[0]:
            return None
        return self.constant + sum(c * v for c, v in zip(self.coefficients, values))


class OverridesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: list[ModelPrice] = []


class PriceBook:
    def __init__(self, overrides: list[ModelPrice] = ()):
        self.overrides = {(price.provider, price.model): price for price in overrides}
        self._rates: dict[tuple, tuple[Decimal, Decimal, Decimal]] = {}  # this hour's, by provider and model
        self._rates_hour: datetime | None = None
        self._linear: dict[int, tuple[object, LinearPrice | None]] = {}  # id of a genai-prices price
        self._names: dict[tuple, str] = {}  # `model_to_price`'s answers
        self._known: dict[tuple, bool] = {}  # `has_price`'s answers

    @classmethod
    def from_file(cls, path: str | Path | None = DEFAULT_OVERRIDES) -> "PriceBook":
        if not path:
            return cls()
        try:
            parsed = OverridesFile.model_validate(tomllib.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:
            raise ValueError(f"price overrides {path}: {error}") from None
        return cls(parsed.model)

    def model_to_price(self, provider: str, answered: str | None, requested: str | None) -> str | None:
        """The name a call is priced by: the model that answered (a dated snapshot of the one
        asked for, say), unless only the name asked for has an override (a negotiated price
        names the model as clients ask for it) or a price at all."""
        if answered is None or answered == requested:
            return requested
        key = (provider, answered, requested)
        if key not in self._names:
            if len(self._names) >= MAX_REMEMBERED_NAMES:
                self._names.clear()
            self._names[key] = self._choose(provider, (answered, requested))
        return self._names[key]

    def has_price(self, provider: str, model: str) -> bool:
        """Whether the model has a price at all (an override or genai-prices'), asked before
        forwarding, on every call's path: the answers are kept."""
        key = (provider, model)
        if key not in self._known:
            if len(self._known) >= MAX_REMEMBERED_NAMES:
                self._known.clear()
            self._known[key] = key in self.overrides or self._in_genai_prices(provider, model)
        return self._known[key]

    @staticmethod
    def _in_genai_prices(provider: str, model: str) -> bool:
        try:
            get_snapshot().find_provider_model(model, None, provider, None)
        except LookupError:
            return False
        return True

    def _choose(self, provider: str, names: tuple[str, str | None]) -> str:
        for name in names:
            if (provider, name) in self.overrides:
                return name
        for name in names:
            if name is not None and self._in_genai_prices(provider, name):
                return name
        return names[0]

    def upper_bound(self, provider: str, model: str, usage: Usage, at: datetime) -> Decimal:
        """At least `provider_cost(usage)`: every unit at the highest rate it can have (input as
        cache writes where those cost more, the top tier of tiered prices), from rates worked out
        once per model and hour. For holds, on every call's path, where exactness is not needed."""
        hour = at.replace(minute=0, second=0, microsecond=0)
        if hour != self._rates_hour:  # a new hour: the last one's rates are not needed again
            self._rates.clear()
            self._rates_hour = hour
        key = (provider, model)
        if key not in self._rates:
            self._rates[key] = self._highest_rates(provider, model, hour)
        per_input, per_output, per_character = self._rates[key]
        characters = usage.input_characters + usage.output_characters
        return usage.input_tokens * per_input + usage.output_tokens * per_output + characters * per_character

    def _highest_rates(self, provider: str, model: str, hour: datetime) -> tuple[Decimal, ...]:
        """The highest rates of the hour: some prices change with the time of day, on the
        quarter hour (DeepSeek's at half past)."""
        moments = [hour + timedelta(minutes=minutes) for minutes in (0, 15, 30, 45)]
        rates = [self._highest_rates_at(provider, model, moment) for moment in moments]
        return tuple(max(values) for values in zip(*rates))

    def _highest_rates_at(self, provider: str, model: str, at: datetime) -> tuple[Decimal, Decimal, Decimal]:
        def rate(**figures: int) -> Decimal:
            try:
                return self.provider_cost(provider, model, Usage(**figures), at) / MILLION
            except UnitNotPriced:
                return Decimal(0)  # such a call ends as an error row

        whole = int(MILLION)  # large enough for the top tier of tiered prices
        input_rate = max(
            rate(input_tokens=whole),
            rate(input_tokens=whole, cache_write_tokens=whole),
            rate(input_tokens=whole, cache_write_tokens=whole, cache_write_1h_tokens=whole),
            rate(input_tokens=whole, input_audio_tokens=whole),
        )
        # Output on top of a long prompt: some prices tier the output by the prompt's length.
        output_rate = max(
            rate(input_tokens=whole, output_tokens=whole),
            rate(input_tokens=whole, output_tokens=whole, output_audio_tokens=whole),
        ) - rate(input_tokens=whole)
        return input_rate, output_rate, rate(input_characters=whole)

    def provider_cost(self, provider: str, model: str, usage: Usage, at: datetime) -> Decimal:
        """The provider's price for `usage`, in force at `at` (some providers price by time)."""
        override = self.overrides.get((provider, model))
        if override is not None:
            return override.cost(usage)
        figures = price_figures(usage)
        try:
            found, info = get_snapshot().find_provider_model(model, None, provider, None)
        except LookupError:
            raise PriceNotFound(f"no price for model {model!r} of provider {provider!r}") from None
        model_price = info.get_prices(at)
        key = id(model_price)  # the entry keeps the price alive, so the id stays its own
        if key not in self._linear:
            self._linear[key] = (model_price, self._learn(found, info, model_price, at), _units(model_price))
        _, linear, units = self._linear[key]
        _require_units(usage, units, provider, model)
        fast = linear.cost(figures) if linear is not None else None
        if fast is not None:
            return fast
        return _genai_cost(found, info, figures, at)

    @staticmethod
    def _learn(found, info, model_price, at: datetime) -> LinearPrice | None:
        if any(isinstance(value, TieredPrices) for value in model_price.__dict__.values()):
            return None
        return LinearPrice.learn(lambda figures: _genai_cost(found, info, figures, at))


# The units a genai-prices price can name, by the ending of its price keys.
_UNIT_OF_KEY = {"mtok": "tokens", "mchars": "characters", "hours": "seconds"}


def _units(model_price) -> frozenset[str]:
    """The units a genai-prices price has rates for; every unit for a price without any rate (a
    free model)."""
    keys = [name for name, value in model_price.__dict__.items() if value is not None]
    units = frozenset(unit for ending, unit in _UNIT_OF_KEY.items() if any(key.endswith(ending) for key in keys))
    return units or frozenset(_UNIT_OF_KEY.values())


def _require_units(usage: Usage, units: set | frozenset, provider: str, model: str) -> None:
    """Some of the units used must have a price (others, say seconds recorded beside tokens
    through the metering API, may go unpriced but for the product's fees)."""
    used = {
        "tokens": usage.input_tokens or usage.output_tokens,
        "characters": usage.input_characters or usage.output_characters,
        "seconds": usage.input_seconds or usage.output_seconds,
    }
    used = {unit for unit, amount in used.items() if amount}
    if used and not used & units:
        raise UnitNotPriced(f"model {model!r} of provider {provider!r} has no price per {' or '.join(sorted(used))}")


def _genai_cost(provider, model, figures: dict[str, int], at: datetime) -> Decimal:
    """genai-prices' own calculation (what `genai_prices.calc_price` does once it has the model)."""
    return model.calc_price(genai_prices.Usage(**figures), provider, genai_request_timestamp=at).total_price
