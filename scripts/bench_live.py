"""A dashboard client on the live page, for `scripts/bench.py`'s target (l): it signs in with the
merchant's secret key and follows `/dashboard/events` as the page's EventSource does (each answer
carries the calls completed since its last event id; it asks again after the `retry` the server
gives), so that the benchmark measures the proxy path while a live page watches every call."""

import http.client
import threading
import time
import urllib.parse


class LivePage:
    def __init__(self, port: int, secret_key: str) -> None:
        self.port = port
        self.calls = 0  # request events received
        self.answers = 0
        self._stop = threading.Event()
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self._connection.request(
            "POST",
            "/dashboard/sign-in",
            urllib.parse.urlencode({"secret_key": secret_key}),
            {"content-type": "application/x-www-form-urlencoded"},
        )
        answer = self._connection.getresponse()
        answer.read()
        self._cookie = answer.getheader("set-cookie", "").split(";")[0]
        if answer.status != 303 or not self._cookie:
            raise RuntimeError(f"the live page could not sign in: {answer.status}")
        self._thread = threading.Thread(target=self._follow, name="live-page", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        last_id, retry = "", 0.25
        while not self._stop.is_set():
            headers = {"cookie": self._cookie, "accept": "text/event-stream"}
            if last_id:
                headers["last-event-id"] = last_id
            try:
                self._connection.request("GET", "/dashboard/events", headers=headers)
                answer = self._connection.getresponse()
                text = answer.read().decode()
            except OSError:
                self._connection.close()  # reconnects at the next request
                time.sleep(retry)
                continue
            if answer.status != 200:
                raise RuntimeError(f"the live page was refused: {answer.status}")
            self.answers += 1
            for event in text.split("\n\n"):
                fields = dict(line.split(": ", 1) for line in event.splitlines() if ": " in line)
                if fields.get("event") == "request":
                    self.calls += 1
                last_id = fields.get("id", last_id)
                retry = int(fields["retry"]) / 1000 if "retry" in fields else retry
            self._stop.wait(retry)

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(timeout=20)
        self._connection.close()
        return f"a live page followed the run: {self.calls} calls in {self.answers} answers"
