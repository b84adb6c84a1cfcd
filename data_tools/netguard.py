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

Refused (unless the user passes --allow-private-network): loopback, private, link-local,
shared (CGNAT 100.64/10), multicast, reserved and unspecified ranges, IPv4 addresses embedded
in IPv6 (mapped, NAT64, 6to4) when the embedded address is refused, and the cloud metadata
addresses, listed explicitly even where a range rule already covers them.
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


class BlockedAddress(Exception):
    """The host resolves to an address downloads may not connect to; nothing was sent."""


def blocked_reason(address: IPAddress) -> str | None:
    """Why a crawl must not connect to `address`, or None if it is a public unicast address."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = blocked_reason(embedded)
        return f"embeds {embedded}, {reason}" if reason else None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{flag}"):
            return f"a {flag.replace('_', '-')} address"
    if not address.is_global:  # shared address space 100.64/10, documentation, benchmarking ranges...
        return "not a globally routable address"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


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
