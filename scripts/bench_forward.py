"""Target w of scripts/bench.py, for reference: a forward-URL addon and nothing else.

Bare mitmdump (targets b and c) forwards only requests sent to it as to a proxy; this addon
lets a client name the gateway's own path instead, as meterproxy's clients do.

`mitmdump -s scripts/bench_forward.py --set bench_upstream=http://127.0.0.1:PORT` in regular
mode sends a direct request for `/openai/v1/chat/completions` (or `/v1/forward?u=<url>`) to
`<bench_upstream>/openai/v1/chat/completions` (or `<url>`): no token, no metering, no ledger.
"""

from urllib.parse import parse_qs, urlsplit

from mitmproxy import ctx, http


class Forward:
    def load(self, loader):
        loader.add_option("bench_upstream", str, "", "Base URL that direct requests are forwarded to.")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.request.method == "CONNECT":
            return
        path = flow.request.path
        if path.startswith("/v1/forward?"):
            flow.request.url = parse_qs(urlsplit(path).query)["u"][0]
        elif path.startswith("/"):
            flow.request.url = ctx.options.bench_upstream.rstrip("/") + path


addons = [Forward()]
