"""Money (SPEC §5): provider cost from genai-prices or the override file, product fees, the split
between wallet and merchant, and 10-decimal exact amounts."""

import random
import re
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import pytest
from genai_prices.data_snapshot import get_snapshot

from meterproxy.token import KeyMode
from meterproxy.usage import Usage
from pricing.fees import Charge, Payer, ProductFees, Tariff, split_charge
from pricing.money import money, money_text
from pricing.prices import DEFAULT_OVERRIDES, ModelPrice, PriceBook, PriceNotFound, UnitNotPriced, price_figures

AT = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
MILLION = Decimal(1_000_000)
USAGE = Usage(input_tokens=12_000, output_tokens=3_500, cached_input_tokens=2_048)


def write_overrides(tmp_path, text: str) -> PriceBook:
    path = tmp_path / "overrides.toml"
    path.write_text(text)
    return PriceBook.from_file(path)


def assert_decimals(*values) -> None:
    for value in values:
        assert type(value) is Decimal, f"{value!r} is not a Decimal"


# --- provider cost ------------------------------------------------------------------------------


def test_gpt_4o_mini_costs_what_genai_prices_says_with_cached_tokens_at_the_cache_read_price():
    reference = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=12_000, output_tokens=3_500, cache_read_tokens=2_048),
        "gpt-4o-mini",
        provider_id="openai",
        genai_request_timestamp=AT,
    )
    per_mtok = reference.model_price
    assert (per_mtok.input_mtok, per_mtok.cache_read_mtok, per_mtok.output_mtok) == (
        Decimal("0.15"),
        Decimal("0.075"),
        Decimal("0.6"),
    )
    by_hand = (
        (12_000 - 2_048) * per_mtok.input_mtok + 2_048 * per_mtok.cache_read_mtok + 3_500 * per_mtok.output_mtok
    ) / MILLION

    cost = PriceBook().provider_cost("openai", "gpt-4o-mini", USAGE, AT)

    assert cost == by_hand == reference.total_price == Decimal("0.0037464")
    assert_decimals(cost)


def test_cached_tokens_are_cheaper_than_uncached_ones():
    cached = PriceBook().provider_cost("openai", "gpt-4o-mini", Usage(input_tokens=1000, cached_input_tokens=1000), AT)
    uncached = PriceBook().provider_cost("openai", "gpt-4o-mini", Usage(input_tokens=1000), AT)
    assert (cached, uncached) == (Decimal("0.000075"), Decimal("0.00015"))


def every_priced_model():
    for provider in get_snapshot().providers:
        for model in provider.models:
            yield provider.id, model.id


def genai_prices_cost(provider: str, model: str, usage: Usage, at: datetime) -> Decimal:
    return genai_prices.calc_price(
        genai_prices.Usage(**price_figures(usage)), model, provider_id=provider, genai_request_timestamp=at
    ).total_price


def test_the_linear_prices_equal_genai_prices_for_every_model_without_tiers():
    """The fast path against genai-prices' own calculation, for every model of its database, at
    two moments and on usage with and without cache tokens (random, and at the edges)."""
    book, draw = PriceBook(), random.Random(7)
    fast = 0
    for provider, model in every_priced_model():
        for at in (AT, datetime(2026, 11, 22, 20, 0, tzinfo=UTC)):
            usages = [Usage(), Usage(input_tokens=9, cached_input_tokens=4, cache_write_tokens=5, output_tokens=1)]
            for _ in range(4):
                total = draw.randrange(0, 2_000_000)
                read = draw.randrange(0, total + 1)
                usages.append(
                    Usage(
                        input_tokens=total,
                        cached_input_tokens=read,
                        cache_write_tokens=draw.randrange(0, total - read + 1),
                        output_tokens=draw.randrange(0, 100_000),
                    )
                )
            for usage in usages:
                try:
                    expected = genai_prices_cost(provider, model, usage, at)
                except (LookupError, ValueError) as error:
                    with pytest.raises(type(error)):
                        book.provider_cost(provider, model, usage, at)
                    continue
                try:
                    actual = book.provider_cost(provider, model, usage, at)
                except UnitNotPriced:  # a model priced by other units: genai-prices' silent zero, refused
                    assert expected == 0, (provider, model, usage, at)
                    continue
                assert actual == expected, (provider, model, usage, at)
    fast = sum(1 for _, linear, _ in book._linear.values() if linear is not None)
    assert fast > 1500  # the fast path did price most models


@pytest.mark.parametrize(
    "usage",
    [
        Usage(input_tokens=10, cached_input_tokens=20),  # more cached than input: genai-prices refuses
        Usage(input_tokens=10, output_tokens=5, input_characters=300),  # characters: not linear here
    ],
)
def test_usage_outside_the_linear_prices_goes_to_genai_prices(usage):
    try:
        expected = genai_prices_cost("openai", "gpt-4o-mini", usage, AT)
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error))):
            PriceBook().provider_cost("openai", "gpt-4o-mini", usage, AT)
    else:
        assert PriceBook().provider_cost("openai", "gpt-4o-mini", usage, AT) == expected


def test_tiered_prices_are_priced_by_genai_prices_on_both_sides_of_the_tier():
    book = PriceBook()
    for input_tokens in (100_000, 300_000):
        usage = Usage(input_tokens=input_tokens, output_tokens=1_000)
        assert book.provider_cost("google", "gemini-2.5-pro", usage, AT) == genai_prices_cost(
            "google", "gemini-2.5-pro", usage, AT
        )
    assert [linear for _, linear, _ in book._linear.values()] == [None]


@pytest.mark.parametrize("provider, model", [("openai", "no-such-model-xyz"), ("no-such-provider", "gpt-4o-mini")])
def test_an_unpriced_model_raises_price_not_found(provider, model):
    with pytest.raises(PriceNotFound) as caught:
        PriceBook().provider_cost(provider, model, USAGE, AT)
    assert str(caught.value) == f"no price for model {model!r} of provider {provider!r}"


OVERRIDES = """
[[model]]
provider = "openai"
model = "gpt-4o-mini"
input_mtok = "0.10"
output_mtok = "0.40"
cache_read_mtok = "0.025"

[[model]]
provider = "openai"
model = "ft:gpt-4o-mini:acme"
input_mtok = "0.30"
output_mtok = "1.20"
"""


def test_an_override_wins_over_genai_prices(tmp_path):
    book = write_overrides(tmp_path, OVERRIDES)
    cost = book.provider_cost("openai", "gpt-4o-mini", USAGE, AT)
    assert cost == (9_952 * Decimal("0.10") + 2_048 * Decimal("0.025") + 3_500 * Decimal("0.40")) / MILLION
    assert cost == Decimal("0.0024464")
    assert_decimals(cost)


def test_an_override_prices_a_model_genai_prices_lacks_with_cache_prices_defaulting_to_input(tmp_path):
    with pytest.raises(PriceNotFound):
        PriceBook().provider_cost("openai", "ft:gpt-4o-mini:acme", USAGE, AT)
    book = write_overrides(tmp_path, OVERRIDES)
    usage = Usage(input_tokens=12_000, output_tokens=3_500, cached_input_tokens=2_048, cache_write_tokens=1_000)
    # cached and cache-write tokens are parts of input_tokens, all at the input price here
    assert book.provider_cost("openai", "ft:gpt-4o-mini:acme", usage, AT) == Decimal("0.0078")


def test_an_override_only_applies_to_its_provider(tmp_path):
    book = write_overrides(tmp_path, OVERRIDES)
    with pytest.raises(PriceNotFound):
        book.provider_cost("mistral", "ft:gpt-4o-mini:acme", USAGE, AT)


CACHE_PRICED = ModelPrice(
    provider="anthropic",
    model="m",
    input_mtok=Decimal("3"),
    output_mtok=Decimal("15"),
    cache_read_mtok=Decimal("0.30"),
    cache_write_mtok=Decimal("3.75"),
)


def test_cache_write_tokens_use_the_cache_write_price():
    price = CACHE_PRICED
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cached_input_tokens=4_000, cache_write_tokens=2_000)
    assert price.cost(usage) == Decimal("0.0357")  # (4000*3 + 4000*0.30 + 2000*3.75 + 1000*15) / 1e6


def test_the_shipped_override_file_prices_the_embedding_models_genai_prices_lacks():
    shipped = PriceBook.from_file(DEFAULT_OVERRIDES)
    assert sorted(model for _, model in shipped.overrides) == [
        "text-embedding-3-large",
        "text-embedding-3-small",
        "text-embedding-ada-002",
    ]
    cost = shipped.provider_cost("openai", "text-embedding-3-small", Usage(input_tokens=1_000_000), AT)
    assert cost == Decimal("0.02")
    assert PriceBook.from_file(None).overrides == {}


@pytest.mark.parametrize(
    "text",
    [
        "[[model]\n",
        '[[model]]\nprovider = "openai"\nmodel = "m"\ninput_mtok = "1"\n',  # no output price
        '[[model]]\nprovider = "openai"\nmodel = "m"\ninput_mtok = "1"\noutput_mtok = "2"\ncolour = "red"\n',
        '[[model]]\nprovider = "openai"\nmodel = "m"\ninput_mtok = "one"\noutput_mtok = "2"\n',
        "models = []\n",
    ],
)
def test_an_invalid_override_file_is_a_value_error(tmp_path, text):
    with pytest.raises(ValueError, match="price overrides"):
        write_overrides(tmp_path, text)


# --- money --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (Decimal("0.06391"), "0.0639100000"),
        (Decimal("0"), "0.0000000000"),
        (0, "0.0000000000"),
        ("12.5", "12.5000000000"),
        (Decimal("0.00000000005"), "0.0000000001"),  # half up, not half even
        (Decimal("0.00000000015"), "0.0000000002"),
        (Decimal("0.000000000049999"), "0.0000000000"),
        (Decimal("1E-7"), "0.0000001000"),  # never scientific notation
        (Decimal("123456.78901234567"), "123456.7890123457"),
    ],
)
def test_money_text_has_exactly_ten_places(value, text):
    assert money_text(value) == text
    assert money(value) == Decimal(text)
    assert_decimals(money(value))


# --- split_charge -------------------------------------------------------------------------------

PROVIDER_COST = Decimal("0.0581")
FEES = ProductFees(fixed_fee=Decimal("0.002"), markup_percent=Decimal("10"))
FEE = Decimal("0.00781")  # 0.002 + 10% of 0.0581


def assert_charge(charge: Charge, provider: str, fees: str, wallet: str, merchant: str, total: str) -> None:
    assert_decimals(charge.provider_cost, charge.fees, charge.wallet_cost, charge.merchant_cost, charge.total_cost)
    assert charge.total_cost == charge.provider_cost + charge.fees
    texts = [money_text(v) for v in (charge.provider_cost, charge.fees, charge.wallet_cost, charge.merchant_cost)]
    assert texts + [money_text(charge.total_cost)] == [provider, fees, wallet, merchant, total]


def test_managed_wallet_pays_provider_cost_and_fees():
    charge = split_charge(PROVIDER_COST, Usage(), FEES, KeyMode.MANAGED)
    assert_charge(charge, "0.0581000000", "0.0078100000", "0.0659100000", "0.0000000000", "0.0659100000")


def test_managed_merchant_pays_the_provider_cost_and_the_wallet_the_fees():
    fees = ProductFees(fixed_fee=Decimal("0.002"), markup_percent=Decimal("10"), provider_cost_payer=Payer.MERCHANT)
    charge = split_charge(PROVIDER_COST, Usage(), fees, KeyMode.MANAGED)
    assert_charge(charge, "0.0581000000", "0.0078100000", "0.0078100000", "0.0581000000", "0.0659100000")
    assert charge.wallet_cost + charge.merchant_cost == charge.total_cost


@pytest.mark.parametrize("payer", list(Payer))
def test_byok_charges_the_wallet_fees_only_and_total_still_includes_the_provider_cost(payer):
    fees = ProductFees(fixed_fee=Decimal("0.002"), markup_percent=Decimal("10"), provider_cost_payer=payer)
    charge = split_charge(PROVIDER_COST, Usage(), fees, KeyMode.UNMANAGED)
    assert_charge(charge, "0.0581000000", "0.0078100000", "0.0078100000", "0.0000000000", "0.0659100000")


@pytest.mark.parametrize("key_mode", list(KeyMode))
def test_metering_only_charges_nobody(key_mode):
    charge = split_charge(PROVIDER_COST, Usage(), None, key_mode)
    assert_charge(charge, "0.0581000000", "0.0000000000", "0.0000000000", "0.0000000000", "0.0581000000")


def test_markup_only_matches_the_spec_example():
    charge = split_charge(PROVIDER_COST, Usage(), ProductFees(markup_percent=Decimal("10")), KeyMode.MANAGED)
    assert money_text(charge.total_cost) == "0.0639100000"


def test_no_fees_product_charges_exactly_the_provider_cost():
    charge = split_charge(PROVIDER_COST, Usage(), ProductFees(), KeyMode.MANAGED)
    assert_charge(charge, "0.0581000000", "0.0000000000", "0.0581000000", "0.0000000000", "0.0581000000")


def test_amounts_are_rounded_to_ten_places_half_up():
    # provider cost 0.00000000005 rounds up to 1e-10; its 50% markup (5e-11) rounds up again
    charge = split_charge(Decimal("0.00000000005"), Usage(), ProductFees(markup_percent=Decimal("50")), KeyMode.MANAGED)
    assert_charge(charge, "0.0000000001", "0.0000000001", "0.0000000002", "0.0000000000", "0.0000000002")
    # an unrounded genai-prices figure (many places) is rounded once, half up
    charge = split_charge(Decimal("0.00376085555"), Usage(), ProductFees(markup_percent=Decimal("3")), KeyMode.MANAGED)
    assert_charge(charge, "0.0037608556", "0.0001128257", "0.0038736813", "0.0000000000", "0.0038736813")


def test_every_amount_is_a_decimal_end_to_end():
    cost = PriceBook().provider_cost("openai", "gpt-4o-mini", USAGE, AT)
    charge = split_charge(cost, Usage(), FEES, KeyMode.MANAGED)
    assert_decimals(
        cost, charge.provider_cost, charge.fees, charge.wallet_cost, charge.merchant_cost, charge.total_cost
    )
    assert_decimals(FEES.fixed_fee, FEES.markup_percent)


@pytest.mark.parametrize("field", ["fixed_fee", "markup_percent"])
def test_negative_fees_are_refused(field):
    with pytest.raises(ValueError):
        ProductFees(**{field: Decimal("-0.01")})


PER_UNIT_RATES = ("input_token_rate", "output_token_rate", "character_rate", "second_rate")


@pytest.mark.parametrize(
    "rate, usage, fee",
    [
        ({"input_token_rate": Decimal("2")}, Usage(input_tokens=3000), "0.0060000000"),
        ({"output_token_rate": Decimal("3")}, Usage(output_tokens=1000), "0.0030000000"),
        ({"character_rate": Decimal("15")}, Usage(input_characters=2000), "0.0300000000"),
        ({"character_rate": Decimal("15")}, Usage(output_characters=4000), "0.0600000000"),
        ({"second_rate": Decimal("0.006")}, Usage(input_seconds=Decimal("12.5")), "0.0750000000"),
        ({"second_rate": Decimal("0.006")}, Usage(output_seconds=Decimal("3")), "0.0180000000"),
    ],
    ids=["input-tokens", "output-tokens", "input-characters", "output-characters", "input-seconds", "output-seconds"],
)
def test_each_per_unit_rate_charges_its_units(rate, usage, fee):
    """Every rate a product can set is charged (per million tokens or characters, per second),
    and only on its own units: the other rates are zero here, and a rate on other units adds
    nothing."""
    charge = split_charge(Decimal("0.01"), usage, ProductFees(**rate), KeyMode.MANAGED)
    assert money_text(charge.fees) == fee and charge.wallet_cost == Decimal("0.01") + Decimal(fee)
    others = {name: Decimal("1000") for name in PER_UNIT_RATES if name not in rate}
    unrelated = split_charge(Decimal("0.01"), usage, ProductFees(**others), KeyMode.MANAGED)
    assert unrelated.fees == 0


def test_the_per_unit_rates_add_up_with_the_fixed_fee_and_the_markup():
    fees = ProductFees(
        fixed_fee=Decimal("0.002"),
        markup_percent=Decimal("10"),
        input_token_rate=Decimal("2"),
        output_token_rate=Decimal("3"),
        character_rate=Decimal("15"),
        second_rate=Decimal("0.006"),
    )
    usage = Usage(
        input_tokens=3000,
        output_tokens=1000,
        input_characters=2000,
        output_characters=4000,
        input_seconds=Decimal("12.5"),
        output_seconds=Decimal("3"),
    )
    # 0.002 + 10% of 0.05 + 0.006 + 0.003 + 0.03 + 0.06 + 0.075 + 0.018
    charge = split_charge(Decimal("0.05"), usage, fees, KeyMode.UNMANAGED)
    assert_charge(charge, "0.0500000000", "0.1990000000", "0.1990000000", "0.0000000000", "0.2490000000")


def test_the_readme_worked_example():
    """The README's numbers, from genai-prices' gpt-4o-mini price and the product's fees."""
    usage = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=200)
    provider_cost = PriceBook().provider_cost("openai", "gpt-4o-mini", usage, AT)
    fees = ProductFees(fixed_fee=Decimal("0.001"), markup_percent=Decimal("10"))
    with_rates = fees.model_copy(update={"input_token_rate": Decimal("0.5"), "output_token_rate": Decimal("1.5")})
    merchant_pays = with_rates.model_copy(update={"provider_cost_payer": Payer.MERCHANT})
    costs = [
        tuple(money_text(value) for value in (charge.total_cost, charge.wallet_cost, charge.merchant_cost))
        for charge in (
            split_charge(provider_cost, usage, fees, KeyMode.MANAGED),
            split_charge(provider_cost, usage, with_rates, KeyMode.MANAGED),
            split_charge(provider_cost, usage, merchant_pays, KeyMode.MANAGED),
            split_charge(provider_cost, usage, with_rates, KeyMode.UNMANAGED),
        )
    ]
    assert costs == [
        ("0.0014785000", "0.0014785000", "0.0000000000"),
        ("0.0027285000", "0.0027285000", "0.0000000000"),
        ("0.0027285000", "0.0022935000", "0.0004350000"),
        ("0.0027285000", "0.0022935000", "0.0000000000"),
    ]


@pytest.mark.parametrize(
    "provider, model",
    [
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5"),
        ("google", "gemini-2.5-flash"),
        ("openai", "tts-1"),
        ("google", "gemini-2.5-pro"),  # output priced by the prompt's tier
    ],
)
@pytest.mark.parametrize(
    "usage",
    [
        Usage(input_tokens=1000, output_tokens=500),
        Usage(input_tokens=300_000, output_tokens=10),
        Usage(input_tokens=600_000, output_tokens=60_000),
        Usage(input_tokens=200_000, cache_write_tokens=200_000, cache_write_1h_tokens=200_000),
        Usage(input_tokens=100_000, input_audio_tokens=100_000, output_tokens=50_000, output_audio_tokens=50_000),
        Usage(input_characters=900),
    ],
)
def test_the_hold_bound_is_never_below_the_price(provider, model, usage):
    """Holds use cached per-unit rates at their highest: never less than the exact price (or
    none for units the model has no price for, which end as error rows)."""
    book = PriceBook()
    try:
        price = book.provider_cost(provider, model, usage, AT)
    except UnitNotPriced:
        price = 0
    assert book.upper_bound(provider, model, usage, AT) >= price
    assert book.upper_bound(provider, model, usage, AT) == book.upper_bound(provider, model, usage, AT)


def test_the_hold_bound_follows_prices_that_change_with_the_hour_and_keeps_only_this_hours_rates():
    """DeepSeek's off-peak hours (from 16:30 UTC) cost half."""
    book, usage = PriceBook(), Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    peak, off_peak = datetime(2025, 6, 1, 12, 0, tzinfo=UTC), datetime(2025, 6, 1, 17, 0, tzinfo=UTC)
    assert book.upper_bound("deepseek", "deepseek-chat", usage, peak) == Decimal("1.37")
    assert book.upper_bound("openai", "gpt-4o-mini", usage, peak) > 0
    assert book.upper_bound("deepseek", "deepseek-chat", usage, off_peak) == Decimal("0.685")
    assert list(book._rates) == [("deepseek", "deepseek-chat")]  # the earlier hour's rates are gone


@pytest.mark.parametrize("minute", [0, 29, 30, 45, 59])
def test_the_hold_bound_holds_in_an_hour_whose_price_changes_on_the_half_hour(minute):
    """DeepSeek's peak hours start at 00:30 UTC, at twice the price of the half hour before."""
    book, usage = PriceBook(), Usage(input_tokens=100, output_tokens=8000)
    at = datetime(2025, 6, 1, 0, minute, tzinfo=UTC)
    assert book.upper_bound("deepseek", "deepseek-chat", usage, at) >= book.provider_cost(
        "deepseek", "deepseek-chat", usage, at
    )


@pytest.mark.parametrize(
    "model, usage",
    [
        ("gpt-4o-mini-tts", Usage(input_characters=1000)),  # priced by the token, not the character
        ("gpt-4o-mini", Usage(input_seconds=Decimal(60))),
        ("tts-1", Usage(input_tokens=1000, output_tokens=10)),
    ],
)
def test_usage_in_units_the_model_has_no_price_for_is_never_a_silent_zero(model, usage):
    with pytest.raises(UnitNotPriced, match=f"model '{model}' of provider 'openai' has no price per"):
        PriceBook().provider_cost("openai", model, usage, AT)


def test_transcription_is_priced_by_the_seconds_of_its_audio():
    minute = PriceBook().provider_cost("openai", "whisper-1", Usage(input_seconds=Decimal(60)), AT)
    assert minute == Decimal("0.006")  # $0.36 an hour
    tokens_too = Usage(input_tokens=10, input_seconds=Decimal(60))  # unpriced units beside priced ones go free
    assert PriceBook().provider_cost("openai", "whisper-1", tokens_too, AT) == minute


def test_anthropic_cache_writes_kept_an_hour_and_gemini_audio_are_priced_at_their_own_rates():
    book, at = PriceBook(), AT
    hour = Usage(input_tokens=100_000, cache_write_tokens=100_000, cache_write_1h_tokens=100_000)
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=100_000, cache_write_tokens=100_000, cache_write_1h_tokens=100_000),
        "claude-sonnet-4-5",
        provider_id="anthropic",
    ).total_price
    assert book.provider_cost("anthropic", "claude-sonnet-4-5", hour, at) == expected
    assert expected > book.provider_cost(
        "anthropic", "claude-sonnet-4-5", Usage(**{**hour.__dict__, "cache_write_1h_tokens": 0}), at
    )
    audio = Usage(input_tokens=100_000, input_audio_tokens=100_000)
    assert book.provider_cost("google", "gemini-2.5-flash", audio, at) > book.provider_cost(
        "google", "gemini-2.5-flash", Usage(input_tokens=100_000), at
    )


# --- the details a mutation run found untested (docs/mutation.md) -------------------------------


def test_speech_by_characters_and_audio_by_seconds_in_and_out_are_priced():
    book = PriceBook()
    assert book.provider_cost("openai", "tts-1", Usage(input_characters=1000), AT) == Decimal("0.015")  # $15 / M
    both_ways = Usage(input_seconds=Decimal(30), output_seconds=Decimal(30))
    assert book.provider_cost("openai", "whisper-1", both_ways, AT) == Decimal("0.006")  # a minute of audio


def test_a_call_without_a_model_costs_nothing_and_a_cached_answer_only_the_fees():
    fees = ProductFees(fixed_fee=Decimal("0.002"), markup_percent=Decimal("10"))
    usage = Usage(input_tokens=1000, output_tokens=100)
    unmetered = Tariff("openai", None, fees, KeyMode.MANAGED).charge(usage, AT, PriceBook())
    assert unmetered == Charge(Decimal(0), Decimal(0), Decimal(0), Decimal(0))
    cached = Tariff("openai", "gpt-4o-mini", fees, KeyMode.MANAGED, free=True).charge(usage, AT, PriceBook())
    assert cached == Charge(Decimal(0), Decimal("0.002"), Decimal("0.002"), Decimal(0))
    byok = Tariff("openai", "gpt-4o-mini", fees, KeyMode.UNMANAGED, free=True).charge(usage, AT, PriceBook())
    assert byok == Charge(Decimal(0), Decimal("0.002"), Decimal("0.002"), Decimal(0))
    per_token = fees.model_copy(update={"input_token_rate": Decimal("1")})  # the fees see the usage
    cached = Tariff("openai", "gpt-4o-mini", per_token, KeyMode.MANAGED, free=True).charge(usage, AT, PriceBook())
    assert cached.fees == Decimal("0.003")


def test_a_tariffs_upper_bound_is_the_top_tiers_price():
    tariff, usage = (
        Tariff("google", "gemini-2.5-pro", None, KeyMode.MANAGED),
        Usage(input_tokens=1000, output_tokens=1000),
    )
    bound, price = (tariff.charge(usage, AT, PriceBook(), upper_bound=flag).provider_cost for flag in (True, False))
    assert bound > price == PriceBook().provider_cost("google", "gemini-2.5-pro", usage, AT)


def test_a_prompt_read_wholly_from_the_cache_has_no_uncached_token():
    assert CACHE_PRICED.cost(Usage(input_tokens=6_000, cached_input_tokens=4_000, cache_write_tokens=2_000)) == Decimal(
        "0.0087"
    )  # (4000*0.30 + 2000*3.75) / 1e6: no token at the input price


def test_the_name_a_call_is_priced_by_is_chosen_for_each_pair_of_names():
    book = PriceBook()
    assert book.model_to_price("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini") == "gpt-4o-mini-2024-07-18"
    assert book.model_to_price("openai", "ft:gpt-4o-mini:acme:x1", "gpt-4o-mini") == "gpt-4o-mini"  # priced nowhere
    assert book.model_to_price("openai", "no-such-model-a", "no-such-model-b") == "no-such-model-a"
    assert book.model_to_price("openai", None, "gpt-4o-mini") == "gpt-4o-mini"


@pytest.mark.parametrize(
    "provider, model, usage",
    [
        ("openai", "gpt-4o-mini", Usage(output_tokens=1_000)),
        ("openai", "tts-1", Usage(input_characters=100, output_characters=100)),
    ],
)
def test_the_hold_bound_covers_output_alone_and_characters_both_ways(provider, model, usage):
    book = PriceBook()
    assert book.upper_bound(provider, model, usage, AT) >= book.provider_cost(provider, model, usage, AT) > 0


@pytest.mark.parametrize("usage", [Usage(input_tokens=10), Usage(output_tokens=10)], ids=["input", "output"])
def test_tokens_of_a_model_priced_by_other_units_are_never_a_silent_zero(usage):
    with pytest.raises(UnitNotPriced):
        PriceBook().provider_cost("openai", "tts-1", usage, AT)
