"""The dashboard (issue 20), in a real browser: Playwright driving Debian's Chromium against the
real gateway. Sign-in, the overview, the requests page's filters, the live page, one merchant
never seeing another's rows or wallets (in the pages and in the API), bad and expired sessions.
Screenshots of each page go to artifacts/."""

import time
from decimal import Decimal

import httpx2
import openai
import pytest

from meterproxy.sessions import COOKIE, Sessions
from tests.browser import chromium, needs_browser, screenshot
from tests.harness import Gateway, make_account, secret

pytestmark = needs_browser

OPERATOR_KEY = secret("operator-key-5c0ffee")
SESSION_KEY = secret("session-signing-key-77a1")
MESSAGES = [{"role": "user", "content": "seen on the dashboard"}]


@pytest.fixture(scope="module")
def site(fake, tmp_path_factory):
    """A gateway with two merchants' calls: `acme` (two models, an error, metadata, a wallet
    running low) and `other` (a model of its own)."""
    env = {"METERPROXY_OPERATOR_KEY": OPERATOR_KEY, "METERPROXY_SESSION_KEY": SESSION_KEY}
    gateway = Gateway(tmp_path_factory.mktemp("dashboard"), fake, env=env)
    gateway.acme = make_account(gateway.store, balance=Decimal("0.5"))
    gateway.other = make_account(gateway.store)
    acme, other = client(gateway, gateway.acme), client(gateway, gateway.other)
    gateway.acme_ids = [
        call(acme, "gpt-4o-mini", extra_headers={"x-lava-metadata-team": "search"}),
        call(acme, "gpt-4o-mini"),
        call(acme, "gpt-4o"),
    ]
    fake.behave(*[{"status": 500}] * 3)
    with pytest.raises(openai.InternalServerError) as failed:
        acme.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    gateway.acme_ids.append(failed.value.response.headers["x-lava-request-id"])
    gateway.other_ids = [call(other, "gpt-4.1-mini")]
    for request_id in gateway.acme_ids + gateway.other_ids:
        gateway.row(request_id)
    yield gateway
    gateway.stop()


def client(gateway: Gateway, account) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)


def call(sdk: openai.OpenAI, model: str, **options) -> str:
    # An output limit keeps the hold small: acme's wallet has less than the cap's $1.
    raw = sdk.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=50, **options)
    return raw.headers["x-lava-request-id"]


@pytest.fixture(scope="module")
def browser():
    with chromium() as instance:
        yield instance


def sign_in(browser, site: Gateway, key: str):
    page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    page.goto(f"{site.url}/dashboard")
    assert page.url == f"{site.url}/dashboard/sign-in"  # not signed in: to the form
    page.fill("#secret_key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.url}/dashboard")
    return page


def ready(page) -> None:
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)


def session_cookie(page) -> dict:
    [cookie] = [cookie for cookie in page.context.cookies() if cookie["name"] == COOKIE]
    return cookie


def test_sign_in_sets_a_strict_http_only_session_and_the_key_stays_out_of_urls_and_storage(browser, site):
    page = sign_in(browser, site, site.acme.secret_key)
    cookie = session_cookie(page)
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/")
    assert cookie["expires"] > time.time()
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
    storage = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert site.acme.secret_key not in storage + page.url
    assert site.acme.secret_key not in "".join(site.output)
    assert page.locator("#viewer").inner_text() == f"test merchant ({site.acme.merchant_id})"


def test_overview_shows_spend_by_period_and_model_top_lists_and_low_wallets(browser, site):
    page = sign_in(browser, site, site.acme.secret_key)
    ready(page)
    rows = [site.store.request(request_id) for request_id in site.acme_ids]
    spend = sum((Decimal(row["total_cost"]) for row in rows), Decimal(0))
    for period in ("1", "7", "30"):
        card = page.locator(f".card[data-period='{period}']")
        assert card.locator(".spend").get_attribute("title") == f"${spend:.10f}"
        assert card.locator(".requests").inner_text() == "4 requests"
    tokens = sum((row["input_tokens"] or 0) + (row["output_tokens"] or 0) for row in rows)
    assert page.locator(".card[data-period='30'] .tokens").inner_text() == f"{tokens} tokens"
    models = page.locator("#top-model tbody tr")
    assert [models.nth(index).locator("td").first.inner_text() for index in range(models.count())] == [
        "gpt-4o",
        "gpt-4o-mini",
    ]  # by spend, most first
    assert "gpt-4.1-mini" not in page.content()  # the other merchant's model
    assert page.locator("#top-product tbody tr td").first.inner_text() == f"test product ({site.acme.product_id})"
    wallet = page.locator(f"#wallets tr[data-wallet-id='{site.acme.wallet_id}']")
    assert wallet.get_attribute("class") == "low"  # $0.50 available is under $1
    assert page.locator("#wallets tbody tr").count() == 1
    available = site.store.wallet(site.acme.wallet_id)["available"]
    assert wallet.locator("td.money").nth(2).get_attribute("data-exact") == available
    assert page.locator("#spend-chart").bounding_box()["height"] > 100
    screenshot(page, "dashboard-overview")


def test_requests_page_filters_and_opens_a_whole_record(browser, site):
    page = sign_in(browser, site, site.acme.secret_key)
    page.goto(f"{site.url}/dashboard/requests")
    ready(page)

    def shown() -> list[str]:
        return page.eval_on_selector_all("#requests tbody tr", "rows => rows.map(row => row.dataset.requestId)")

    assert shown() == site.acme_ids[::-1]  # newest first, only acme's
    for field, value, expected in [
        ("select[name=status]", "error", [site.acme_ids[3]]),
        ("input[name=model]", "gpt-4o-mini", site.acme_ids[1::-1]),
        ("input[name=metadata]", "team=search", [site.acme_ids[0]]),
    ]:
        page.goto(f"{site.url}/dashboard/requests")
        ready(page)
        page.select_option(field, value) if field.startswith("select") else page.fill(field, value)
        page.evaluate("document.body.dataset.ready = 'false'")
        page.click("#filters button[type=submit]")
        ready(page)
        assert shown() == expected, field
    page.fill("input[name=metadata]", "")
    page.fill("input[name=created_after]", "2000-01-01T00:00")
    page.fill("input[name=created_before]", "2000-01-02T00:00")
    page.evaluate("document.body.dataset.ready = 'false'")
    page.click("#filters button[type=submit]")
    ready(page)
    assert shown() == []
    screenshot(page, "dashboard-requests")

    page.goto(f"{site.url}/dashboard/requests?status=error")
    ready(page)
    page.click(f"tr[data-request-id='{site.acme_ids[3]}']")
    page.wait_for_selector("#detail:not([hidden])")
    row = site.store.request(site.acme_ids[3])
    field = lambda name: page.locator(f"#detail dd[data-field='{name}']").inner_text()  # noqa: E731
    assert (field("status"), field("total_cost"), field("upstream_status")) == ("error", "0.0000000000", "500")
    assert field("error_message") == row["error_message"] and field("latency_ms") == str(row["latency_ms"])
    screenshot(page, "dashboard-request-detail")


def test_live_page_shows_a_call_within_two_seconds_with_its_exact_cost(browser, site):
    page = sign_in(browser, site, site.acme.secret_key)
    page.goto(f"{site.url}/dashboard/live")
    ready(page)  # the event stream is open
    others = call(client(site, site.other), "gpt-4.1-mini")
    request_id = call(client(site, site.acme), "gpt-4o-mini")
    shown = page.locator(f"#live tr[data-request-id='{request_id}']")
    shown.wait_for(timeout=2_000)
    row = site.row(request_id)
    cost = shown.locator("td.money")
    assert (
        cost.get_attribute("data-exact") == row["total_cost"] and cost.get_attribute("title") == f"${row['total_cost']}"
    )
    assert cost.inner_text() == f"${Decimal(row['total_cost']).normalize():f}"  # three significant digits
    assert shown.locator("td.tokens").inner_text() == f"{row['input_tokens']} → {row['output_tokens']}"
    assert page.locator(f"#live tr[data-request-id='{others}']").count() == 0  # another merchant's call
    screenshot(page, "dashboard-live")


def test_the_operator_sees_every_merchant_and_a_merchant_only_its_own(browser, site):
    operator = sign_in(browser, site, OPERATOR_KEY)
    operator.goto(f"{site.url}/dashboard/requests")
    ready(operator)
    everyone = operator.eval_on_selector_all("#requests tbody tr", "rows => rows.map(row => row.dataset.requestId)")
    assert set(site.acme_ids + site.other_ids) <= set(everyone)
    assert operator.locator("#viewer").inner_text() == "Operator: every merchant"

    other = sign_in(browser, site, site.other.secret_key)
    other.goto(f"{site.url}/dashboard/requests")
    ready(other)
    theirs = other.eval_on_selector_all("#requests tbody tr", "rows => rows.map(row => row.dataset.requestId)")
    assert site.other_ids[0] in theirs and not set(site.acme_ids) & set(theirs)
    other.goto(f"{site.url}/dashboard")
    ready(other)
    assert other.locator("#wallets tbody tr").count() == 1
    assert other.locator(f"#wallets tr[data-wallet-id='{site.acme.wallet_id}']").count() == 0

    cookies = {COOKIE: session_cookie(other)["value"]}
    api = httpx2.Client(base_url=site.url, cookies=cookies)
    assert api.get(f"/v1/requests/{site.acme_ids[0]}").status_code == 404
    listed = [record["request_id"] for record in api.get("/v1/requests", params={"limit": 100}).json()["data"]]
    assert site.other_ids[0] in listed and not set(site.acme_ids) & set(listed)
    assert [wallet["id"] for wallet in api.get("/v1/wallets").json()["data"]] == [site.other.wallet_id]
    models = {group["model"] for group in api.get("/v1/usage", params={"group_by": "model"}).json()["data"]}
    assert "gpt-4o" not in models
    # A session only reads: it cannot record usage (that takes the secret key itself).
    assert api.post("/v1/requests", json={"provider": "openai", "model": "gpt-4o"}).status_code == 401


def test_bad_expired_and_signed_out_sessions_are_refused(browser, site):
    sessions = Sessions(SESSION_KEY.encode())
    now = time.time()
    forged = Sessions(b"not the gateway's key").start(site.acme.merchant_id, now)
    expired = sessions.start(site.acme.merchant_id, now - sessions.lifetime - 1)
    for cookie in (forged, expired, "garbage", sessions.start(site.acme.merchant_id, now)[:-2] + "xx"):
        api = httpx2.Client(base_url=site.url, cookies={COOKIE: cookie})
        assert api.get("/v1/requests").status_code == 401
        assert api.get("/dashboard/events").status_code == 401
        page = api.get("/dashboard")
        assert (page.status_code, page.headers["location"]) == (303, "/dashboard/sign-in")
    valid = httpx2.Client(base_url=site.url, cookies={COOKIE: sessions.start(site.acme.merchant_id, now)})
    assert valid.get("/v1/requests").status_code == 200  # the same key, in date: accepted

    page = sign_in(browser, site, site.acme.secret_key)
    signed_in = session_cookie(page)["value"]
    page.click("#sign-out")
    page.wait_for_url(f"{site.url}/dashboard/sign-in")
    assert [cookie for cookie in page.context.cookies() if cookie["name"] == COOKIE] == []
    assert httpx2.get(f"{site.url}/v1/requests", cookies={COOKIE: signed_in}).status_code == 401

    page.fill("#secret_key", "msk_not_a_key")
    page.click("button[type=submit]")
    page.wait_for_selector("#failed:not([hidden])")
    assert page.url == f"{site.url}/dashboard/sign-in?failed=1"
    assert page.context.cookies() == []
    screenshot(page, "dashboard-sign-in-refused")
