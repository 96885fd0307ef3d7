"""meterproxy: load with `mitmdump -s addons/gateway.py` (or mitmweb).

Addons run in this order for every hook: routing finds the provider, auth swaps the forward
token for the provider key, metering reads usage, and the ledger records and charges. The
metering API answers `/v1/requests` and `/v1/usage` itself.
"""

import gc
import inspect

from genai_prices.data_snapshot import get_snapshot
from mitmproxy import hooks

from addons.api import MeteringApi
from addons.auth import Auth
from addons.cache import ResponseCache
from addons.ledger import Ledger
from addons.limits import Limits
from addons.metering import Metering
from addons.resilience import Retries, UpstreamWatch
from addons.routing import Routing


class Settled:
    """Once the proxy runs, what start-up loaded (mitmproxy, the price database, the addons)
    lives as long as the process: frozen out of the garbage collector's sight, so that its
    full collections stop walking it again and again."""

    def running(self):
        get_snapshot()  # the price database, loaded now rather than by the first call
        gc.freeze()


class Pipeline:
    """The gateway's concerns as one mitmproxy addon: every event calls their hooks in order.

    Each concern is an addon in mitmproxy's own style (options declared in `load`, hooks named
    for events), tested alone in `taddons` contexts. Loaded as mitmproxy's children, each of
    their hooks costs a few microseconds of mitmproxy's dispatch on top of its own work (finding
    it, building its arguments, awaiting it), some twenty times a call: called from here instead,
    meterproxy went from 0.78 to 0.83 × bare mitmdump's requests per second (`scripts/bench.py`).
    As in mitmproxy, a hook may return an awaitable, and the next concern's hook waits for it;
    an exception in one hook skips the concerns after it (mitmproxy logs it).
    """

    def __init__(self, *concerns) -> None:
        for event in hooks.all_hooks:
            chain = tuple(hook for concern in concerns if callable(hook := getattr(concern, event, None)))
            if chain:
                setattr(self, event, _in_turn(chain))


def _in_turn(chain: tuple):
    """Call `chain`'s hooks one after the other; without waiting until one returns an awaitable."""

    def run(*args):
        for position, hook in enumerate(chain):
            pending = hook(*args)
            if pending is not None and inspect.isawaitable(pending):
                return _after(pending, chain[position + 1 :], args)
        return None

    return run


async def _after(pending, chain: tuple, args: tuple) -> None:
    await pending
    for hook in chain:
        pending = hook(*args)
        if pending is not None and inspect.isawaitable(pending):
            await pending


ledger = Ledger()
routing = Routing()
auth = Auth()
# Order matters: retries replace a failed answer before auth scrubs keys from it and metering
# reads it; limits refuse before the pending row is written; the cache answers after admission
# and keeps an answer once it is metered; the upstream watch runs last before forwarding.
addons = [
    Pipeline(
        routing,
        Retries(auth),
        auth,
        Metering(),
        Limits(),
        ledger,
        ResponseCache(ledger),
        UpstreamWatch(),
        MeteringApi(ledger, routing),
        Settled(),
    )
]
