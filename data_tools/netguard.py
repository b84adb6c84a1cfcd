"""SSRF guard for downloads: which addresses a crawl may connect to, decided at connect time.

A URL list is untrusted input. Without a guard, `http://169.254.169.254/...` reads the cloud
metadata service (credentials), `http://127.0.0.1:8080/admin` reaches services on the crawling
machine, and a public name that resolves to 10.0.0.5 reaches the private network. Checking the
URL's host string is not enough: `127.1`, `0x7f000001`, `2130706433` and `[::ffff:127.0.0.1]`
all mean loopback, and a hostile DNS server can answer a public address to a first lookup and
a private one to the second (DNS rebinding).

So the check sits where the socket is opened: `GuardedBackend` is the httpcore network backend
of the download client. It resolves the host once, refuses the connection if any resolved
address is not a public unicast address, and connects to the checked address itself, so no
second lookup can swap it. Every redirect hop opens its connection through the same backend,
so redirects are checked too. A refused host sees no packet, let alone a request.

Allowed (unless the user passes --allow-private-network, which lifts the guard): an address
`ipaddress` calls global that is not multicast, is in IPv6's global unicast space 2000::/3, and is
in none of `DENIED_NETWORKS` (our own copy of the IANA special-purpose blocks that are not
globally reachable, plus the globally reachable anycast and identifier blocks that are no image
host, so the decision does not depend on the Python patch release: 3.11.7's `ipaddress` calls
fec0::/10, 3fff::/20 and 192.0.0.8 global) and is no cloud metadata address. An IPv6 address
that embeds an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo) is judged
by the IPv4 address it reaches; Teredo is refused in any case (2001::/32). tests/test_netguard.py
checks a sample of every block of both IANA registries.
"""

from __future__ import annotations

import ipaddress
import socket
import typing

import anyio
import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Metadata services of the major clouds (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS ECS
# task metadata 169.254.170.2; AWS IPv6 fd00:ec2::254; Alibaba Cloud 100.100.100.200; Oracle
# 192.0.0.192; Tencent Cloud metadata.tencentyun.com resolves to 169.254.0.23).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.0.23", "100.100.100.200", "192.0.0.192", "fd00:ec2::254")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
# IANA special-purpose blocks (IPv4 and IPv6 registries) refused whatever `ipaddress` says of them.
# Sub-blocks the registry calls globally reachable are refused with their parent (PCP/TURN anycast
# in 192.0.0.0/24; AMT, AS112, ORCHIDv2, drone DETs and anycast in 2001::/23), as is the deprecated
# 6to4 relay anycast: no image is served from them. The registry's other globally reachable blocks
# (192.31.196.0/24, 192.52.193.0/24, 192.175.48.0/24, 2620:4f:8000::/48: AS112, AMT) are allowed.
DENIED_NETWORKS: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {
    ipaddress.ip_network(block): why
    for block, why in (
        ("0.0.0.0/8", "'this network'"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("192.0.0.0/24", "IETF protocol assignments (incl. PCP/TURN anycast, NAT64 discovery)"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("240.0.0.0/4", "reserved"),
        ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation"),
        ("100::/64", "discard-only"),
        ("100:0:0:1::/64", "dummy IPv6 prefix"),
        ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID, AMT, AS112, anycast)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing (SRv6) SIDs"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "deprecated site-local"),
    )
}
class BlockedAddress(Exception):
    """The host resolves to an address downloads may not connect to; nothing was sent."""


def blocked_reason(address: IPAddress) -> str | None:
    """Why a crawl must not connect to `address`, or None if it is a public unicast address."""
    embedded = _embedded_ipv4(address)
    for inner in embedded:
        reason = blocked_reason(inner)
        if reason is not None:
            return f"embeds {inner}, {reason}"
    if embedded and isinstance(address, ipaddress.IPv6Address) and address.teredo is None:
        return None  # mapped, NAT64, 6to4: the packet goes to the public IPv4 address; Teredo is judged below
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for network, why in DENIED_NETWORKS.items():
        if address in network:
            return f"in {network}, {why}"
    for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{flag}"):
            return f"a {flag.replace('_', '-')} address"
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST_V6:
        return "outside the IPv6 global unicast space 2000::/3"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _embedded_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address hands its packets to: mapped, NAT64, 6to4, Teredo (server, client)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address in _NAT64:
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address.teredo is not None:
        return address.teredo
    return ()


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (IP literals in any form getaddrinfo accepts included)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone id
        if address not in addresses:
            addresses.append(address)
    return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend that resolves once, checks, and connects to the checked address."""

    def __init__(self, allow_private: bool = False) -> None:
        self.allow_private = allow_private
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except (OSError, UnicodeError, ValueError) as err:
            raise httpcore.ConnectError(f"cannot resolve {host}: {err}") from None
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        if not self.allow_private:
            # One bad address refuses the host: otherwise a name listing a public and a private
            # address would reach the private one whenever the public one fails.
            for address in addresses:
                reason = blocked_reason(address)
                if reason is not None:
                    raise BlockedAddress(f"{host} resolves to {address}, {reason}")
        error: Exception | None = None
        for address in addresses:  # the checked addresses, never the name: no second lookup
            try:
                return await self._backend.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                error = err
        assert error is not None
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: typing.Any = None) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are never used for downloads")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)
