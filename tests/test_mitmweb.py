"""mitmweb, the inspection view (SPEC: `mitmweb -s addons/gateway.py`): rendered in headless
Chromium, its flow list shows each metered call's cost, model and tokens without opening it,
under the provider URL the client meant; its API refuses whoever lacks its token."""

import json
import re
import socket
import time

import httpx2
import openai
import pytest

from tests.browser import chromium, needs_browser, screenshot
from tests.harness import MANAGED_KEYS, Gateway, make_account

MESSAGES = [{"role": "user", "content": "seen in mitmweb"}]
# The README's command: a list option takes one value per --set.
COLUMNS = [
    arg for name in ("index", "method", "path", "status", "time", "comment") for arg in ("--set", f"web_columns={name}")
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mitmweb(fake, tmp_path):
    port = free_port()
    args = ("--no-web-open-browser", "--web-host", "127.0.0.1", "--web-port", str(port))
    web = Gateway(tmp_path, fake, program="mitmweb", args=(*args, *COLUMNS))
    try:
        deadline = time.monotonic() + 10
        while not (found := re.search(r"Web server listening at (http://\S+\?token=(\w+))", "".join(web.output))):
            assert time.monotonic() < deadline, "mitmweb printed no URL with its token"
            time.sleep(0.05)
        web.web_url, web.web_token, web.web_api = found.group(1), found.group(2), f"http://127.0.0.1:{port}"
        yield web
    finally:
        web.stop()


def comments(web: Gateway, count: int) -> list[dict]:
    """The flows as mitmweb's API gives them, once `count` of them have their comment."""
    deadline = time.monotonic() + 10
    while True:
        flows = httpx2.get(f"{web.web_api}/flows", headers={"authorization": f"Bearer {web.web_token}"}).json()
        if sum(bool(flow["comment"]) for flow in flows) >= count or time.monotonic() > deadline:
            return flows
        time.sleep(0.05)


def test_mitmweb_api_refuses_a_request_without_its_token(mitmweb):
    assert httpx2.get(f"{mitmweb.web_api}/flows").status_code == 403
    assert httpx2.get(f"{mitmweb.web_api}/flows", params={"token": "0" * 32}).status_code == 403
    assert httpx2.get(f"{mitmweb.web_api}/flows", params={"token": mitmweb.web_token}).status_code == 200


@needs_browser
def test_mitmweb_flow_list_shows_cost_model_and_tokens_without_opening_the_flow(mitmweb):
    account = make_account(mitmweb.store)
    client = openai.OpenAI(base_url=f"{mitmweb.url}/openai/v1", api_key=account.token(), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    request_id = raw.headers["x-lava-request-id"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{mitmweb.url}/openai/v1", api_key="garbage", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    row = mitmweb.row(request_id)
    assert (row["input_tokens"], row["output_tokens"], row["total_cost"]) == (9, 5, "0.0000043500")
    glance = "$0.00000435 gpt-4o-mini 9→5"  # 9 × $0.15/M + 5 × $0.60/M, as the issue shows it
    flows = comments(mitmweb, 2)
    assert [(flow["comment"], flow["marked"]) for flow in flows] == [
        (f"{glance} · openai · managed · {request_id}", "\N{HEAVY CHECK MARK}"),
        ("refused 401 invalid_token: forward token is not base64-encoded JSON", "\N{HEAVY MULTIPLICATION X}"),
    ]
    shown = json.dumps(flows)
    assert MANAGED_KEYS["OPENAI_API_KEY"] not in shown and account.token() not in shown
    saved = httpx2.get(f"{mitmweb.web_api}/flows/dump", params={"token": mitmweb.web_token})
    assert saved.status_code == 200 and request_id.encode() in saved.content  # plain data on the flows

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 500})
        page.goto(mitmweb.web_url)  # the printed URL: its token becomes mitmweb's cookie
        metered = page.locator("tr", has_text=request_id)
        try:
            metered.wait_for(timeout=15_000)
        finally:
            screenshot(page, "mitmweb-flow-list")
        comment = metered.locator("td.col-comment")
        assert comment.inner_text().startswith(glance)
        # The column is 150 px wide (mitmweb's CSS): the cost fits whole, the model begins there
        # (in DejaVu Sans, Linux's default font, `$0.00000435 gpt-…`; the cell has all of it).
        cost = glance.partition(" ")[0]
        cost_right, cell_right = comment.evaluate(
            """(cell, length) => {
                const range = document.createRange();
                range.setStart(cell.firstChild, 0);
                range.setEnd(cell.firstChild, length);
                return [range.getBoundingClientRect().right, cell.getBoundingClientRect().right];
            }""",
            len(cost) + len(" gpt"),
        )
        assert cost_right <= cell_right
        path = metered.locator("td.col-path").inner_text()
        assert "https://api.openai.com/v1/chat/completions" in path and "\N{HEAVY CHECK MARK}" in path
        assert page.locator("tr", has_text="refused 401 invalid_token").count() == 1


def test_mitmweb_keeps_a_streamed_answers_body_that_the_client_got_chunk_by_chunk(mitmweb):
    """mitmproxy 12's store_streamed_bodies, turned on under mitmweb: a stream's flow shows it."""
    account = make_account(mitmweb.store)
    client = openai.OpenAI(base_url=f"{mitmweb.url}/openai/v1", api_key=account.token(), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = list(raw.parse())
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "w0 w1 w2 w3 w4"
    [flow] = comments(mitmweb, 1)
    body = httpx2.get(
        f"{mitmweb.web_api}/flows/{flow['id']}/response/content.data", params={"token": mitmweb.web_token}
    )
    assert body.status_code == 200
    assert all(f'"content": "{word}'.encode() in body.content.replace(b'":"', b'": "') for word in ("w0", " w4"))
    assert body.content.rstrip().endswith(b"data: [DONE]")
