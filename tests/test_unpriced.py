"""A model with no price (SPEC §5): refused before forwarding when anyone would be charged for
it, served as an `error` row that charges nothing when the operator says so, and passed as today
for metering-only calls."""

from decimal import Decimal

import openai
import pytest

from pricing.fees import ProductFees
from tests.harness import Gateway, make_account

UNPRICED = "gpt-unpriced-experimental"
MESSAGES = [{"role": "user", "content": "Say hello to the ledger"}]
PROMPT_TOKENS = 3 + 3 + 5  # the fake provider's documented formula
FEES = ProductFees(fixed_fee=Decimal("0.001"))


@pytest.fixture(scope="module")
def serving(fake, tmp_path_factory):
    """A gateway whose operator chose to serve unpriced models."""
    gateway = Gateway(tmp_path_factory.mktemp("serving"), fake, args=("--set", "meterproxy_unpriced=serve"))
    yield gateway
    gateway.stop()


def client(gateway, token):
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0)


def refused_as_unpriced(gateway, fake, token):
    audit_before, rows_before = len(gateway.audit()), len(gateway.rows())
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client(gateway, token).chat.completions.create(model=UNPRICED, messages=MESSAGES)
    error = raised.value
    assert (error.status_code, error.code) == (403, "model_not_priced")
    assert f"model {UNPRICED!r} has no price for provider 'openai'" in error.message
    assert fake.requests() == []
    [entry] = gateway.audit_since(audit_before)
    assert (entry["status"], entry["code"], entry["request_id"]) == (
        403,
        "model_not_priced",
        error.response.headers["x-lava-request-id"],
    )
    assert len(gateway.rows()) == rows_before


def answered(gateway, fake, token) -> dict:
    raw = client(gateway, token).chat.completions.with_raw_response.create(model=UNPRICED, messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
    assert len(fake.requests()) == 1
    return gateway.row(raw.headers["x-lava-request-id"])


def test_a_managed_call_to_an_unpriced_model_is_refused_before_forwarding(gateway, fake):
    account = make_account(gateway.store)  # no fees: the wallet would pay the provider cost alone
    refused_as_unpriced(gateway, fake, account.token())
    assert gateway.store.wallet_balance(account.wallet_id) == Decimal("10")


def test_a_byok_call_is_refused_when_its_product_has_fees(gateway, fake):
    account = make_account(gateway.store, FEES)
    refused_as_unpriced(gateway, fake, account.token(provider_key="sk-customer-own-unpriced-1"))


def test_a_byok_call_whose_product_has_no_fees_passes_charging_nobody(gateway, fake):
    account = make_account(gateway.store)
    row = answered(gateway, fake, account.token(provider_key="sk-customer-own-unpriced-2"))
    assert (row["status"], row["key_mode"], row["wallet_cost"]) == ("error", "unmanaged", "0.0000000000")


def test_a_metering_only_call_passes_as_an_error_row(gateway, fake):
    account = make_account(gateway.store, FEES)
    row = answered(gateway, fake, account.token(provider_key="sk-customer-own-unpriced-3", billed=False))
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("error", PROMPT_TOKENS, 5)
    assert row["error_message"] == f"no price for model {UNPRICED!r} of provider 'openai'"
    assert (row["connection_id"], row["total_cost"]) == (None, "0.0000000000")


def test_a_priced_model_passes_the_check(gateway, fake):
    account = make_account(gateway.store, FEES)
    response = client(gateway, account.token()).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert response.choices[0].message.content == "w0 w1 w2 w3 w4"


def test_serve_answers_an_unpriced_model_as_an_error_row_that_charges_nothing(serving, fake):
    account = make_account(serving.store, FEES)
    row = answered(serving, fake, account.token())
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("error", PROMPT_TOKENS, 5)
    assert UNPRICED in row["error_message"]
    assert (row["total_cost"], row["wallet_cost"]) == ("0.0000000000", "0.0000000000")
    assert serving.store.wallet_balance(account.wallet_id) == Decimal("10")
    assert serving.audit() == []
