"""meterproxy: load with `mitmdump -s addons/gateway.py` (or mitmweb).

The concerns run as one addon (`addons/pipeline.py`), in this order for every hook: routing finds
the provider, auth swaps the forward token for the provider key, metering reads usage, and the
ledger records and charges. The gateway answers its own paths itself: the metering API
(`/v1/requests`, `/v1/usage`, `/v1/wallets`), `/metrics` and the dashboard.
"""

import gc

from genai_prices.data_snapshot import get_snapshot

from addons.api import MeteringApi
from addons.auth import Auth
from addons.cache import ResponseCache
from addons.dashboard import Dashboard
from addons.destinations import Destinations
from addons.failures import UpstreamFailures
from addons.inspection import Inspection
from addons.ledger import Ledger
from addons.limits import Limits
from addons.metering import Metering
from addons.metrics import Metrics
from addons.pipeline import Pipeline
from addons.proxy_credentials import ProxyCredentials
from addons.resilience import Retries, UpstreamWatch
from addons.routing import Routing
from addons.settings import Settings
from meterproxy.sessions import Sessions


class Settled:
    """Once the proxy runs, what start-up loaded (mitmproxy, the price database, the addons)
    lives as long as the process: frozen out of the garbage collector's sight, so that its
    full collections stop walking it again and again."""

    def running(self):
        get_snapshot()  # the price database, loaded now rather than by the first call
        gc.freeze()


ledger = Ledger()
routing = Routing()
auth = Auth()
sessions = Sessions()
# Order matters: mitmproxy's refusal of missing proxy credentials is answered in the OpenAI shape
# first; the passthrough policy refuses a proxied destination before anything else sees
# it; retries replace a failed answer before auth scrubs keys from it and metering
# reads it; limits refuse before the pending row is written; the cache answers after admission
# and keeps an answer once it is metered; the upstream watch runs last before forwarding.
addons = [
    Pipeline(
        ProxyCredentials(),
        Destinations(routing),
        routing,
        Retries(auth),
        auth,
        Metering(),
        Limits(),
        ledger,
        ResponseCache(ledger),
        UpstreamWatch(),
        UpstreamFailures(),
        Metrics(ledger),
        MeteringApi(ledger, routing, sessions),
        Dashboard(ledger, sessions),
        Inspection(),
        Settled(),
        Settings(),  # last: by its `load`, every meterproxy option is registered
    )
]
