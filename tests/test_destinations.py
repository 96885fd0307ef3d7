"""No open relay (SPEC §1.3): the passthrough policy for proxied traffic to hosts that are not
providers, as a unit (every address range) and through the real gateway's proxy port."""

import base64
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import openai
import pytest

from meterproxy.destinations import OwnListeners, Policy, kind, refusal
from tests.harness import ROOT, Gateway, make_account, raw_exchange

# --- the classification, over every range ----------------------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: the IPv4 address it carries
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
        ("64:ff9b::808:808", "public"),  # NAT64 of 8.8.8.8
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),  # shared address space (carrier-grade NAT)
        ("192.0.2.1", "private"),  # documentation ranges count as private in Python's table
        ("8.8.8.8", "public"),
        ("1.1.1.1", "public"),
        ("172.32.0.1", "public"),  # just past 172.16/12
        ("2606:4700:4700::1111", "public"),
    ],
)
def test_every_range_is_classified(address, expected):
    assert kind(ipaddress.ip_address(address)) == expected


def addresses(*texts: str) -> list:
    return [ipaddress.ip_address(text) for text in texts]


def test_public_refuses_a_name_whose_addresses_are_public_and_private_alike():
    reason = refusal(addresses("8.8.8.8", "10.0.0.1"), 443, Policy.PUBLIC, OwnListeners())
    assert reason == "10.0.0.1 is a private address"
    assert refusal(addresses("8.8.8.8"), 443, Policy.PUBLIC, OwnListeners()) is None


def test_all_passes_private_addresses_but_never_to_the_gateways_own_listeners():
    own = OwnListeners([("127.0.0.1", 8080), ("", 8081)])
    assert refusal(addresses("10.0.0.1", "127.0.0.1"), 9000, Policy.ALL, own) is None
    assert refusal(addresses("127.0.0.1"), 8080, Policy.ALL, own) == "127.0.0.1 port 8080 is the gateway's own listener"
    # A wildcard listener is reached on every address of the machine, and on no other.
    assert refusal(addresses("127.0.0.2"), 8081, Policy.ALL, own) == "127.0.0.2 port 8081 is the gateway's own listener"
    assert refusal(addresses("8.8.8.8"), 8081, Policy.ALL, own) is None
    # A listener named rather than numbered (mitmweb's --web-host localhost) is resolved once.
    named = OwnListeners([("localhost", 8082)])
    assert (
        refusal(addresses("127.0.0.1"), 8082, Policy.ALL, named) == "127.0.0.1 port 8082 is the gateway's own listener"
    )
    assert refusal(addresses("10.0.0.9"), 8082, Policy.ALL, named) is None


# --- through the gateway's proxy port --------------------------------------------------------


class Listener:
    """A loopback server that counts the connections it accepts: a refused destination sees none."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, 0), family=family)
        self.port = self.socket.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            connection.close()

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def listeners():
    ipv4, ipv6 = Listener(), Listener("::1")
    yield ipv4, ipv6
    ipv4.close()
    ipv6.close()


def through_proxy(gateway: Gateway, request: bytes) -> tuple[int, dict, dict]:
    status, headers, body = raw_exchange(gateway.port, request)
    return status, headers, json.loads(body)


def connect(host: str, port: int) -> bytes:
    return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def absolute(host: str, port: int) -> bytes:
    return f"GET http://{host}:{port}/secret HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


@pytest.mark.parametrize(
    "form, destination",
    [
        (form, destination)
        for form in (connect, absolute)
        for destination in ("loopback", "the gateway's own port", "[::1]", "localhost")
        if (form, destination) != (absolute, "the gateway's own port")  # a direct call: see below
    ],
)
def test_a_proxied_request_to_a_local_destination_is_refused_and_audited(gateway, listeners, form, destination):
    ipv4, ipv6 = listeners
    host, port, shown = {
        "loopback": ("127.0.0.1", ipv4.port, "127.0.0.1"),
        "the gateway's own port": ("127.0.0.1", gateway.port, "127.0.0.1"),
        "[::1]": ("[::1]", ipv6.port, "::1"),
        "localhost": ("localhost", ipv4.port, "127.0.0.1"),
    }[destination]
    accepted, audited = ipv4.accepted + ipv6.accepted, len(gateway.audit())

    status, headers, body = through_proxy(gateway, form(host, port))

    assert (status, body["error"]["code"], body["error"]["type"]) == (403, "destination_refused", "permission_error")
    assert shown in body["error"]["message"]
    [entry] = gateway.audit_since(audited)
    assert (entry["status"], entry["code"], entry["request_id"]) == (
        403,
        "destination_refused",
        headers["x-lava-request-id"],
    )
    assert ipv4.accepted + ipv6.accepted == accepted  # nothing connected
    assert gateway.rows() == [] or all(row["request_id"] != entry["request_id"] for row in gateway.rows())


def test_a_request_in_absolute_form_that_names_the_gateway_itself_is_answered_by_the_gateway(gateway):
    """mitmproxy 12 turns the absolute form into the origin form before any addon sees it: a
    request naming the gateway's own address is a direct call, served or refused by the gateway
    itself and never relayed."""
    audited = len(gateway.audit())
    status, _, body = through_proxy(gateway, absolute("127.0.0.1", gateway.port).replace(b"/secret", b"/v1/usage"))
    assert (status, body["error"]["code"]) == (401, "invalid_secret_key")
    status, headers, body = through_proxy(gateway, absolute("127.0.0.1", gateway.port))
    assert (status, body["error"]["code"]) == (404, "unknown_endpoint")
    assert [entry["request_id"] for entry in gateway.audit_since(audited, 2)][1] == headers["x-lava-request-id"]


@pytest.fixture(scope="module")
def closed_gateway(fake, tmp_path_factory):
    gateway = Gateway(tmp_path_factory.mktemp("none"), fake, args=("--set", "meterproxy_passthrough=none"))
    yield gateway
    gateway.stop()


def test_under_none_every_host_that_is_not_a_provider_is_refused(closed_gateway):
    status, _, body = through_proxy(closed_gateway, connect("example.test", 443))
    assert (status, body["error"]["code"]) == (403, "destination_refused")
    assert "meterproxy_passthrough is 'none'" in body["error"]["message"]


# --- private, link-local and public destinations: test hosts in network namespaces -------------


def namespaces_unavailable() -> str | None:
    """Why the namespaces cannot be made here, or None."""
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    probe = subprocess.run(["ip", "netns", "add", f"mp-probe-{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` is not allowed here: {probe.stderr.strip() or probe.returncode}"
    subprocess.run(["ip", "netns", "delete", f"mp-probe-{os.getpid()}"], capture_output=True)
    return None


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory):
    """Two namespaces of the test's own, linked by a veth pair: the gateway's and the hosts'."""
    gateway_ns, hosts_ns = f"mp-gw-{os.getpid()}", f"mp-hosts-{os.getpid()}"
    hosts_log = tmp_path_factory.mktemp("hosts") / "connections"
    hosts_log.touch()
    veth_gateway, veth_hosts = f"mpg{os.getpid() % 10000}", f"mph{os.getpid() % 10000}"
    commands = [
        f"netns add {gateway_ns}",
        f"netns add {hosts_ns}",
        f"link add {veth_gateway} type veth peer name {veth_hosts}",
        f"link set {veth_gateway} netns {gateway_ns}",
        f"link set {veth_hosts} netns {hosts_ns}",
        f"-n {gateway_ns} link set lo up",
        f"-n {gateway_ns} link set {veth_gateway} up",
        f"-n {gateway_ns} addr add 10.23.0.1/24 dev {veth_gateway}",
        f"-n {gateway_ns} route add 169.254.169.254/32 dev {veth_gateway}",
        f"-n {gateway_ns} route add 1.2.3.4/32 dev {veth_gateway}",
        f"-n {hosts_ns} link set lo up",
        f"-n {hosts_ns} link set {veth_hosts} up",
        *(
            f"-n {hosts_ns} addr add {address} dev {veth_hosts}"
            for address in ("10.23.0.2/24", "169.254.169.254/32", "1.2.3.4/32")
        ),
    ]
    try:
        for command in commands:
            subprocess.run(["ip", *command.split()], check=True, capture_output=True)
        hosts = subprocess.Popen(
            ["ip", "netns", "exec", hosts_ns, sys.executable, "tests/netns_hosts.py", str(hosts_log)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert hosts.stdout.readline().strip() == "listening"
        yield gateway_ns, hosts_log
        hosts.kill()
        hosts.wait()
    finally:
        for namespace in (gateway_ns, hosts_ns):  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


@pytest.mark.skipif(namespaces_unavailable() is not None, reason=str(namespaces_unavailable()))
def test_private_and_link_local_hosts_are_refused_and_a_public_one_passes_byte_for_byte(namespaces):
    gateway_ns, hosts_log = namespaces
    scenario = subprocess.run(
        ["ip", "netns", "exec", gateway_ns, sys.executable, "tests/netns_scenario.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert scenario.returncode == 0, scenario.stderr[-3000:]
    report = json.loads(scenario.stdout.strip().splitlines()[-1])

    public = report["public"]["results"]
    for refused in ("CONNECT private", "absolute private", "CONNECT link-local", "absolute link-local"):
        assert public[refused]["status"] == 403, refused
    for refused in ("absolute private", "absolute link-local"):
        assert json.loads(public[refused]["body"])["error"]["code"] == "destination_refused"
    assert public["CONNECT public"] == {"status": 200, "echoed": True}
    assert report["public"]["audit"] == ["destination_refused"] * 4

    closed = report["none"]["results"]
    assert {name: result["status"] for name, result in closed.items()} == dict.fromkeys(closed, 403)
    assert report["none"]["audit"] == ["destination_refused"] * 5
    # The hosts saw one connection in all: the public one, under `public`.
    assert hosts_log.read_text().split() == ["1.2.3.4"]


def test_mitmwebs_api_cannot_be_reached_through_the_proxy_even_under_all(fake, tmp_path):
    """mitmweb's web port is one of the gateway's own listeners: refused whatever the policy."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web_port = probe.getsockname()[1]
    args = ("--no-web-open-browser", "--web-host", "127.0.0.1", "--web-port", str(web_port))
    web = Gateway(tmp_path, fake, program="mitmweb", args=(*args, "--set", "meterproxy_passthrough=all"))
    try:
        for request in (connect("127.0.0.1", web_port), absolute("127.0.0.1", web_port)):
            status, _, body = through_proxy(web, request)
            assert (status, body["error"]["code"]) == (403, "destination_refused")
            assert (
                body["error"]["message"]
                == f"destination refused: 127.0.0.1 port {web_port} is the gateway's own listener"
            )
    finally:
        web.stop()


def test_mitmproxys_proxyauth_guards_the_proxy_and_the_gateways_own_calls(fake, tmp_path):
    """`--set proxyauth=…`: every request on the port needs Proxy-Authorization, which mitmproxy
    removes; the forward token in Authorization is the gateway's as usual."""
    gateway = Gateway(tmp_path, fake, args=("--set", "proxyauth=ops:s3cret-proxy"))
    try:
        account = make_account(gateway.store)
        credentials = "Basic " + base64.b64encode(b"ops:s3cret-proxy").decode()
        audited = len(gateway.audit())
        status, headers, body = raw_exchange(gateway.port, connect("example.test", 443))
        assert (status, headers["proxy-authenticate"]) == (407, 'Basic realm="mitmproxy"')
        assert json.loads(body)["error"]["code"] == "proxy_auth_required"
        anonymous = openai.OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=account.token(), max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            anonymous.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert (refused.value.status_code, refused.value.code) == (407, "proxy_auth_required")
        entries = gateway.audit_since(audited, 2)
        assert [entry["code"] for entry in entries] == ["proxy_auth_required"] * 2
        assert entries[1]["request_id"] == refused.value.response.headers["x-lava-request-id"]
        client = openai.OpenAI(
            base_url=f"{gateway.url}/openai/v1",
            api_key=account.token(),
            max_retries=0,
            default_headers={"Proxy-Authorization": credentials},
        )
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().choices[0].message.content == "w0 w1 w2 w3 w4"
        assert gateway.row(raw.headers["x-lava-request-id"])["status"] == "completed"
        [seen] = fake.requests()
        assert "proxy-authorization" not in dict(seen["headers"])
    finally:
        gateway.stop()


def test_a_refused_connect_closes_the_connection(gateway, listeners):
    """mitmproxy keeps a refused CONNECT's destination on the client's connection: a request sent
    after it on the same connection would be taken for the tunnel's. There is no such request."""
    ipv4, _ = listeners
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as proxy:
        proxy.sendall(connect("127.0.0.1", ipv4.port))
        answer = b""
        while chunk := proxy.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 403") and b"connection: close" in answer.lower()
