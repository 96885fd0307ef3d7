"""The passthrough policy against private, link-local and public destinations, run by
tests/test_destinations.py inside a network namespace of its own (`ip netns exec`), linked by a
veth pair to a second namespace that holds the test hosts (tests/netns_hosts.py) on a private
(10.23.0.2), a link-local (169.254.169.254) and a public-range (1.2.3.4) address. Neither
namespace has a route anywhere else, so even a wrong gateway reaches nothing outside them.
Prints a JSON report: per policy, what each destination got."""

import json
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import FakeProvider, Gateway, raw_exchange  # noqa: E402

DESTINATIONS = {"private": "10.23.0.2", "link-local": "169.254.169.254", "public": "1.2.3.4"}
SENT = b"\x00raw bytes \xff through the tunnel\r\n\r\n"


def tunnel(gateway: Gateway, address: str) -> dict:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as proxy:
        proxy.sendall(f"CONNECT {address}:7 HTTP/1.1\r\nHost: {address}:7\r\n\r\n".encode())
        head = proxy.recv(65536)
        status = int(head.split()[1])
        if status != 200:
            return {"status": status}
        proxy.sendall(SENT)
        echoed = b""
        while len(echoed) < len(SENT) and (chunk := proxy.recv(65536)):
            echoed += chunk
        return {"status": status, "echoed": echoed == SENT}


def absolute(gateway: Gateway, address: str) -> dict:
    request = f"GET http://{address}:7/ HTTP/1.1\r\nHost: {address}:7\r\n\r\n".encode()
    status, _, body = raw_exchange(gateway.port, request)
    return {"status": status, "body": body.decode()}


def main() -> None:
    fake = FakeProvider()
    report = {}
    try:
        for policy in ("public", "none"):
            tmp = Path(tempfile.mkdtemp())
            gateway = Gateway(tmp, fake, args=("--set", f"meterproxy_passthrough={policy}"))
            try:
                results = {}
                for name, address in DESTINATIONS.items():
                    results[f"CONNECT {name}"] = tunnel(gateway, address)
                    if name != "public":  # a plain-HTTP request to an echo server would hang
                        results[f"absolute {name}"] = absolute(gateway, address)
                report[policy] = {
                    "results": results,
                    "audit": [entry["code"] for entry in gateway.audit_since(0, 4 if policy == "public" else 5)],
                }
            finally:
                gateway.stop()
    finally:
        fake.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
