"""Inspection in mitmweb: each metered flow shows provider, model, tokens, cost, key mode and
request id in its comment (the flow list's comment column and the detail view), and a mark;
refused flows say why. Add the column with `--set web_columns=…,comment`."""

from mitmproxy import ctx, http
from mitmproxy.hooks import UpdateHook

from meterproxy.call import Call
from meterproxy.errors import GatewayError
from meterproxy.ledger import describe

MARKS = {"completed": ":moneybag:", "error": ":warning:"}
REFUSED = ":no_entry:"


def show_refusal(flow: http.HTTPFlow, refusal: GatewayError) -> None:
    flow.comment = f"refused {refusal.status} {refusal.code}: {refusal.message}"
    flow.marked = REFUSED


def show_settled(flow: http.HTTPFlow, call: Call, fields: dict) -> None:
    """Called once the writer has priced the call, after the flow's own hooks: tell the UI."""
    row = {
        "provider": call.target.provider.name,
        "key_mode": call.key_mode.value,
        "request_id": call.request_id,
        **fields,
    }
    flow.comment = describe(row)
    flow.marked = MARKS[row["status"]]
    if hasattr(ctx.master, "view"):  # a UI shows the flow (mitmweb): tell it
        ctx.master.addons.trigger(UpdateHook([flow]))
