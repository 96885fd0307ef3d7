"""Inspection in mitmweb: each metered flow says what it cost at a glance.

The comment begins with what fits in mitmweb's comment column (150 px): the cost, the model and
the tokens in → out (`$0.00000435 gpt-4o-mini 9→5`), then provider, key mode and request id. The
flow list shows the provider URL the client meant (not the upstream it was sent to, which a
providers file may point elsewhere), and a mark that any font draws (mitmweb shows a mark as
text: its colour circles are emoji, which need an emoji font, and it shows 🔴 for a name it does
not know). Refused flows say why. Add the column with `--set web_columns=…,comment`.
"""

from mitmproxy import ctx, http
from mitmproxy.hooks import UpdateHook

from meterproxy.call import Call
from meterproxy.errors import GatewayError
from meterproxy.ledger import describe

# Names from mitmproxy's emoji table whose glyphs (✔ ⚠ ✖) are in DejaVu Sans, the fallback
# font of a desktop without an emoji font.
MARKS = {"completed": ":heavy_check_mark:", "error": ":warning:"}
REFUSED = ":heavy_multiplication_x:"


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
    # The exchange is over: the flow may name the URL the client meant again.
    flow.request.url = call.target.url.partition("?")[0]
    if hasattr(ctx.master, "view"):  # a UI shows the flow (mitmweb): tell it
        ctx.master.addons.trigger(UpdateHook([flow]))


class Inspection:
    """Under a UI that keeps flows (mitmweb), a streamed answer's body is kept too (mitmproxy 12's
    `store_streamed_bodies`), so that a stream's flow shows what the client got; the client still
    gets it chunk by chunk. `--set store_streamed_bodies=…` given explicitly is left alone."""

    def running(self):
        option = "store_streamed_bodies"
        if hasattr(ctx.master, "view") and ctx.options.default(option) == getattr(ctx.options, option):
            setattr(ctx.options, option, True)
