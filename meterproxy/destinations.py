"""Where proxied traffic to hosts that are not providers may go (SPEC §1.3): never an open relay.

The gateway's proxy port must be reachable by the app servers, so whoever reaches it could use
it to reach what sits behind it: loopback services, the cloud metadata address, private ranges,
the gateway's own listeners (mitmweb's API among them). The passthrough policy decides, on the
resolved address, so that a public name that resolves to 127.0.0.1 is refused too.
"""

import enum
import ipaddress
import socket
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Policy(enum.StrEnum):
    PUBLIC = "public"  # only to public addresses (the default)
    NONE = "none"  # to providers only
    ALL = "all"  # anywhere: the old behaviour, for a trusted network


def kind(address: Address) -> str:
    """What an address is, for the reason of a refusal: `public` or the range that makes it not."""
    address = embedded_ipv4(address) or address
    for name in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if not address.is_global:  # shared (100.64/10), documentation, benchmarking ranges
        return "non-public"
    return "public"


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to its destination: mapped (::ffff:127.0.0.1), NAT64
    (64:ff9b::7f00:1), 6to4 (2002:7f00:1::) or Teredo's client."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)


def refusal(addresses: Iterable[Address], port: int, policy: Policy, own: "OwnListeners") -> str | None:
    """Why traffic to `addresses` (all a name resolves to) on `port` is refused, or None.
    Every address must pass: a name that resolves to a public and a loopback address is refused."""
    for address in addresses:
        if own.includes(address, port):
            return f"{address} port {port} is the gateway's own listener"
        if policy is Policy.PUBLIC and (what := kind(address)) != "public":
            return f"{address} is a {what} address"
    return None


class OwnListeners:
    """The gateway's listening sockets (proxy ports, mitmweb's web port): a tunnel to one of them
    would reach the gateway itself, or mitmweb's API, from outside. A listener's name is resolved
    once, here, when the list is made (at start)."""

    WILDCARDS = ("", "0.0.0.0", "::")

    def __init__(self, listeners: Iterable[tuple[str, int]] = ()) -> None:
        self.wildcard_ports: set[int] = set()
        self.bound: set[tuple[Address, int]] = set()
        for host, port in listeners:
            if host in self.WILDCARDS:
                self.wildcard_ports.add(port)
            else:
                self.bound.update((address, port) for address in resolve(host))

    def includes_any(self, addresses: Iterable[Address], port: int) -> bool:
        return any(self.includes(address, port) for address in addresses)

    def includes(self, address: Address, port: int) -> bool:
        """A wildcard listener is reached on every address of the machine, and on no other."""
        if (address, port) in self.bound:
            return True
        return port in self.wildcard_ports and is_local(address)


def resolve(host: str) -> list[Address]:
    """Every address `host` stands for (blocking: for start-up only)."""
    if (address := parse_address(host)) is not None:
        return [address]
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [parse_address(entry[4][0]) for entry in found]


def is_local(address: Address) -> bool:
    """Whether `address` is one of this machine's own: only those can be bound."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def parse_address(host: str) -> Address | None:
    """`host` as an IP address (brackets and an IPv6 zone allowed), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None
