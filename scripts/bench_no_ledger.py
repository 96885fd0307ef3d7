"""Target n of scripts/bench.py, for reference: meterproxy without its ledger.

The gateway's concerns in the gateway's order (`addons/gateway.py`), less the ledger and the two
that need it (the response cache, the metering API): routing, the provider key in place of the
token, the body limit, usage read from every answer. No token checked against the database, no
hold, no pending row, no completion, no price: what (d) costs beyond this is the ledger's.
"""

from addons.auth import Auth
from addons.limits import Limits
from addons.metering import Metering
from addons.pipeline import Pipeline
from addons.resilience import Retries, UpstreamWatch
from addons.routing import Routing

auth = Auth()
addons = [Pipeline(Routing(), Retries(auth), auth, Metering(), Limits(), UpstreamWatch())]
