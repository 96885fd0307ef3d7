"""The pure parts behind the dashboard, metrics and mitmweb's comment, without mitmproxy:
sessions, the live feed, grouped rollups, the comment's wording, the metrics' model labels."""

import asyncio
from decimal import Decimal

from addons.live import LiveFeed
from meterproxy import queries
from meterproxy.ledger import describe, plain_dollars
from meterproxy.metrics import MAX_MODELS, GatewayMetrics
from meterproxy.sessions import Sessions

NOW = 1_800_000_000.0


def test_a_session_names_its_viewer_until_it_expires_or_ends():
    sessions = Sessions(b"k" * 32, lifetime=60)
    merchant, operator = sessions.start("mer_1", NOW), sessions.start(None, NOW)
    assert sessions.viewer(merchant, NOW + 59).merchant_id == "mer_1"
    assert sessions.viewer(operator, NOW).operator
    assert sessions.viewer(merchant, NOW + 60) is None  # expired
    ended = sessions.viewer(merchant, NOW)
    sessions.end(ended, NOW)
    assert sessions.viewer(merchant, NOW) is None
    assert sessions.viewer(sessions.start("mer_1", NOW), NOW) is not None  # a new sign-in is another session


def test_a_session_signed_with_another_key_or_altered_is_refused():
    sessions = Sessions(b"k" * 32)
    cookie = sessions.start("mer_1", NOW)
    payload, _, signature = cookie.partition(".")
    forged_payload = Sessions(b"k" * 32).start(None, NOW).partition(".")[0]  # the operator's claims
    for bad in (Sessions(b"x" * 32).start("mer_1", NOW), f"{forged_payload}.{signature}", payload, "", None, "a.b"):
        assert sessions.viewer(bad, NOW) is None, bad


def test_the_live_feed_gives_each_merchant_its_own_rows_after_its_moment():
    feed = LiveFeed()
    start = feed.position(repr(feed.now()))
    feed.publish({"request_id": "r1", "merchant_id": "a"})
    feed.publish({"request_id": "r2", "merchant_id": "b"})
    assert [row["request_id"] for _, row in feed.after(start, "a")] == ["r1"]
    assert [row["request_id"] for _, row in feed.after(start, None)] == ["r1", "r2"]  # the operator
    [(moment, _)] = feed.after(start, "a")
    assert [row["request_id"] for _, row in feed.after(feed.position(repr(moment)), None)] == ["r2"]  # not r1 again
    assert feed.after(feed.now(), None) == []
    assert feed.position("garbage") is None and feed.position(None) is None and feed.position("nan") is None


def test_a_waiting_page_wakes_for_its_merchant_only():
    async def scenario():
        feed = LiveFeed()
        start = feed.now()
        waiting = asyncio.create_task(feed.wait(start, "a", timeout=30))
        await asyncio.sleep(0)
        feed.publish({"request_id": "theirs", "merchant_id": "b"})
        await asyncio.sleep(0)
        assert not waiting.done()  # another merchant's call does not end the wait
        feed.publish({"request_id": "mine", "merchant_id": "a"})
        rows, moment = await asyncio.wait_for(waiting, 5)
        assert [row["request_id"] for row in rows] == ["mine"] and moment == feed.latest
        assert await feed.wait(moment, "a", timeout=0.01) == ([], moment)  # nothing new: ends empty

    asyncio.run(scenario())


def test_rollups_group_by_several_keys_with_exact_sums():
    rows = [
        {"created_at": "2026-12-01T10:00:00Z", "model": "m1", "total_cost": "0.1000000000"},
        {"created_at": "2026-12-01T11:00:00Z", "model": "m1", "total_cost": "0.2000000000"},
        {"created_at": "2026-12-01T12:00:00Z", "model": "m2", "total_cost": "0.0000000001"},
        {"created_at": "2026-12-02T10:00:00Z", "model": None, "total_cost": "0"},
    ]
    rows = [{**dict.fromkeys(queries.FIGURES, 1), "wallet_cost": None, "merchant_cost": None, **row} for row in rows]
    grouped = queries.rollup(rows, "day,model")
    assert [(group["day"], group["model"], group["requests"], group["total_cost"]) for group in grouped] == [
        ("2026-12-01", "m1", 2, "0.3000000000"),
        ("2026-12-01", "m2", 1, "0.0000000001"),
        ("2026-12-02", None, 1, "0.0000000000"),
    ]


def test_the_comment_begins_with_cost_model_and_tokens():
    row = {
        "status": "completed",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "key_mode": "managed",
        "request_id": "req_1",
        "input_tokens": 9,
        "output_tokens": 5,
        "total_cost": "0.0000043500",
    }
    assert describe(row) == "$0.00000435 gpt-4o-mini 9→5 · openai · managed · req_1"
    assert describe({**row, "usage_source": "estimated"}).startswith("$0.00000435 gpt-4o-mini 9→5 · estimated · ")
    failed = {**row, "status": "error", "error_message": "provider answered HTTP 500"}
    assert describe(failed) == "$0 gpt-4o-mini error: provider answered HTTP 500 · openai · managed · req_1"
    assert (plain_dollars("12.5000000000"), plain_dollars("0.0000000000"), plain_dollars("0.0000000001")) == (
        "12.5",
        "0",
        "0.0000000001",
    )


def test_metrics_count_a_bounded_number_of_model_labels():
    metrics = GatewayMetrics()
    row = {"provider": "p", "status": "completed", "key_mode": "managed", "total_cost": "0.5000000000"}
    for index in range(MAX_MODELS + 3):
        metrics.record({**row, "model": f"m{index}", "input_tokens": 2})
    assert metrics.requests.labels("p", "other", "completed", "managed")._value.get() == 3
    assert metrics.cost.labels("p", "m0", "managed")._value.get() == float(Decimal("0.5"))
