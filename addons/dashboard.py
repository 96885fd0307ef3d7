"""The dashboard at `/dashboard` on the gateway's own port (SPEC §9): a merchant signs in with
its secret key and sees its spend, requests, wallets and a live view of its calls; the
operator's key (`METERPROXY_OPERATOR_KEY`) sees every merchant's.

    GET  /dashboard/sign-in        the form; POST it (the key in the body, never in a URL)
    POST /dashboard/sign-out
    GET  /dashboard                overview     GET /dashboard/requests    GET /dashboard/live
    GET  /dashboard/events         the live view's server-sent events (`addons/live.py`)
    GET  /dashboard/session        who is signed in
    GET  /dashboard/static/<file>  the pages' scripts and styles, Chart.js (vendored)

The pages are static files that read the metering API (`addons/api.py`) with the session's
cookie (HttpOnly, SameSite=Strict). Each server-sent events response carries what completed
since the page's last event id and ends; the browser's EventSource asks again at once, so a
waiting page holds no connection open between events and the proxy path does not notice it.
"""

import hmac
import json
import logging
import os
import time
import urllib.parse
from pathlib import Path

from mitmproxy import ctx, http

from addons.auth import REDACTED
from addons.calls import answer, own_path
from addons.ledger import Ledger
from addons.live import LiveFeed
from meterproxy import queries
from meterproxy.api_models import RequestRecord
from meterproxy.errors import GatewayError
from meterproxy.ids import new_id
from meterproxy.sessions import COOKIE, Sessions, Viewer

STATIC = Path(__file__).parent / "static"
PAGES = {
    "/dashboard": ("overview", "Overview"),
    "/dashboard/requests": ("requests", "Requests"),
    "/dashboard/live": ("live", "Live"),
}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".md": "text/plain"}
OPERATOR_ENV = "METERPROXY_OPERATOR_KEY"
WAIT = 15.0  # seconds an events response waits for a call to complete before it ends empty
RETRY_MS = 250  # how soon the page asks again
SECURITY = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
log = logging.getLogger("meterproxy")


class Dashboard:
    def __init__(self, ledger: Ledger, sessions: Sessions) -> None:
        self.ledger = ledger
        self.sessions = sessions
        self.feed = LiveFeed()
        ledger.settled.append(self.feed.publish)
        # Small, and read once: serving them never touches the disk. A page is its own part
        # (`dashboard/<page>.html`: its scripts and its <main>) in the common layout.
        self.files = {
            path.relative_to(STATIC).as_posix(): path.read_bytes() for path in STATIC.rglob("*") if path.is_file()
        }
        layout = self.files["dashboard/layout.html"].decode()
        self.pages = {
            path: layout.replace("{title}", title)
            .replace("{page}", page)
            .replace("{main}", self.files[f"dashboard/{page}.html"].decode())
            .encode()
            for path, (page, title) in PAGES.items()
        }

    def load(self, loader):
        loader.add_option("meterproxy_session_minutes", int, 480, "How long a dashboard sign-in lasts.")

    def configure(self, updated):
        if "meterproxy_session_minutes" in updated:
            self.sessions.lifetime = ctx.options.meterproxy_session_minutes * 60

    def request(self, flow: http.HTTPFlow):
        path = own_path(flow)
        if path is None or not (path == "/dashboard" or path.startswith("/dashboard/")):
            return None
        return self._serve(flow, path)

    async def _serve(self, flow: http.HTTPFlow, path: str) -> None:
        request = flow.request
        try:
            if path.startswith("/dashboard/static/"):
                self._file(flow, path.removeprefix("/dashboard/static/"))
            elif path == "/dashboard/sign-in" and request.method == "POST":
                await self._sign_in(flow)
            elif path == "/dashboard/sign-in":
                self._file(flow, "dashboard/sign-in.html")
            else:
                viewer = self.sessions.viewer(request.cookies.get(COOKIE), time.time())
                request.headers.pop("cookie", None)  # the flow may be kept (mitmweb): no session on it
                await self._signed_in(flow, path, viewer)
        except GatewayError as error:
            answer(flow, error)
        if flow.response is not None:
            flow.response.headers.update(SECURITY)

    async def _signed_in(self, flow: http.HTTPFlow, path: str, viewer: Viewer | None) -> None:
        if viewer is None:
            if path in PAGES:
                flow.response = _redirect("/dashboard/sign-in")
                return
            raise GatewayError(401, "sign in at /dashboard/sign-in", "not_signed_in")
        if path in PAGES:
            flow.response = http.Response.make(200, self.pages[path], {"content-type": TYPES[".html"]})
        elif path == "/dashboard/session":
            who = "operator" if viewer.operator else "merchant"
            name = None if viewer.operator else await self._merchant_name(viewer.merchant_id)
            body = {"viewer": who, "merchant_id": viewer.merchant_id, "name": name, "expires": viewer.expires}
            flow.response = _json(200, body)
        elif path == "/dashboard/events":
            await self._events(flow, viewer)
        elif path == "/dashboard/sign-out" and flow.request.method == "POST":
            self.sessions.end(viewer, time.time())
            flow.response = _redirect("/dashboard/sign-in", f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
        else:
            raise GatewayError(404, f"no such page {path}", "not_found")

    async def _sign_in(self, flow: http.HTTPFlow) -> None:
        """The secret key comes in the form's body: read, then taken off the flow."""
        form = urllib.parse.parse_qs((flow.request.content or b"").decode("utf-8", "replace"))
        flow.request.content = f"secret_key={REDACTED}".encode()
        secret_key = (form.get("secret_key") or [""])[0].strip()
        operator_key = os.environ.get(OPERATOR_ENV, "")
        if operator_key and hmac.compare_digest(secret_key.encode(), operator_key.encode()):
            merchant_id = None
        else:
            try:
                merchant = await self.ledger.store_thread.call(lambda store: store.merchant(secret_key))
            except GatewayError as error:
                self.ledger.audit(flow, new_id("req"), error, target_host=None)
                flow.response = _redirect("/dashboard/sign-in?failed=1")
                return
            merchant_id = merchant["id"]
        cookie = self.sessions.start(merchant_id, time.time())
        lifetime = int(self.sessions.lifetime)
        flow.response = _redirect(
            "/dashboard", f"{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={lifetime}"
        )

    async def _events(self, flow: http.HTTPFlow, viewer: Viewer) -> None:
        moment = self.feed.position(flow.request.headers.get("last-event-id"))
        if moment is None:  # a new page: from now on
            rows, cursor = [], self.feed.now()
        else:
            rows, cursor = await self.feed.wait(moment, viewer.merchant_id, WAIT)
        events = [f"retry: {RETRY_MS}\n\n"]
        for row in rows:
            record = RequestRecord.from_row(row).model_dump_json()
            events.append(f"event: request\ndata: {record}\n\n")
        events.append(f"id: {cursor!r}\n\n")  # exactly the moment: no row twice
        headers = {"content-type": "text/event-stream", "cache-control": "no-store"}
        flow.response = http.Response.make(200, "".join(events), headers)

    async def _merchant_name(self, merchant_id: str) -> str | None:
        names = await self.ledger.store_thread.call(lambda store: queries.names(store.db, merchant_id))
        return names.get(merchant_id)

    def _file(self, flow: http.HTTPFlow, name: str) -> None:
        content = self.files.get(name)
        if content is None or flow.request.method not in ("GET", "HEAD"):
            raise GatewayError(404, f"no such file {name}", "not_found")
        content_type = TYPES.get(Path(name).suffix, "application/octet-stream")
        flow.response = http.Response.make(200, content, {"content-type": content_type})


def _redirect(location: str, cookie: str | None = None) -> http.Response:
    headers = {"location": location, **({"set-cookie": cookie} if cookie else {})}
    return http.Response.make(303, b"", headers)


def _json(status: int, body: dict) -> http.Response:
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json"})
