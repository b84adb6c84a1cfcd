"""The download address guard against every block of the IANA special-purpose address registries.

Each block of the IPv4 and IPv6 special-purpose registries (iana-ipv4-special-registry,
iana-ipv6-special-registry, as of 2025) appears below with a sample address inside it, plus the
blocks of the address-space registries a crawl must not reach either (multicast, IPv6 site-local,
IPv6 outside 2000::/3). An address is expected allowed only where the registry calls its block
globally reachable and it is an ordinary public host; blocks the registry calls globally reachable
but that sit inside a refused parent (anycast service addresses, ORCHIDv2...) are expected refused.
Addresses are only classified here, never contacted.
"""

from __future__ import annotations

import ipaddress

import pytest

from data_tools.netguard import blocked_reason

# (block, registry name, sample address, allowed?)
IPV4_SPECIAL = [
    ("0.0.0.0/8", "This network", "0.1.2.3", False),
    ("0.0.0.0/32", "This host on this network", "0.0.0.0", False),
    ("10.0.0.0/8", "Private-Use", "10.20.30.40", False),
    ("100.64.0.0/10", "Shared Address Space", "100.64.0.1", False),
    ("127.0.0.0/8", "Loopback", "127.0.0.2", False),
    ("169.254.0.0/16", "Link Local", "169.254.1.1", False),
    ("172.16.0.0/12", "Private-Use", "172.31.255.254", False),
    ("192.0.0.0/24", "IETF Protocol Assignments", "192.0.0.100", False),
    ("192.0.0.0/29", "IPv4 Service Continuity Prefix", "192.0.0.1", False),
    ("192.0.0.8/32", "IPv4 dummy address", "192.0.0.8", False),
    ("192.0.0.9/32", "Port Control Protocol Anycast (globally reachable; no image host)", "192.0.0.9", False),
    ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast (globally reachable; no image host)", "192.0.0.10", False),
    ("192.0.0.170/32", "NAT64/DNS64 Discovery", "192.0.0.170", False),
    ("192.0.0.171/32", "NAT64/DNS64 Discovery", "192.0.0.171", False),
    ("192.0.2.0/24", "Documentation (TEST-NET-1)", "192.0.2.1", False),
    ("192.31.196.0/24", "AS112-v4 (globally reachable)", "192.31.196.1", True),
    ("192.52.193.0/24", "AMT (globally reachable)", "192.52.193.1", True),
    ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "192.88.99.1", False),
    ("192.168.0.0/16", "Private-Use", "192.168.1.1", False),
    ("192.175.48.0/24", "Direct Delegation AS112 Service (globally reachable)", "192.175.48.1", True),
    ("198.18.0.0/15", "Benchmarking", "198.19.255.1", False),
    ("198.51.100.0/24", "Documentation (TEST-NET-2)", "198.51.100.7", False),
    ("203.0.113.0/24", "Documentation (TEST-NET-3)", "203.0.113.9", False),
    ("240.0.0.0/4", "Reserved", "250.1.2.3", False),
    ("255.255.255.255/32", "Limited Broadcast", "255.255.255.255", False),
    # Not special-purpose, but no unicast host: the IPv4 multicast space.
    ("224.0.0.0/4", "Multicast (address-space registry)", "233.252.0.1", False),
]

IPV6_SPECIAL = [
    ("::1/128", "Loopback Address", "::1", False),
    ("::/128", "Unspecified Address", "::", False),
    ("::ffff:0:0/96", "IPv4-mapped Address (judged by the IPv4 address)", "::ffff:10.0.0.1", False),
    ("64:ff9b::/96", "IPv4-IPv6 Translat. (judged by the IPv4 address)", "64:ff9b::a00:1", False),
    ("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local use)", "64:ff9b:1::808:808", False),
    ("100::/64", "Discard-Only Address Block", "100::1", False),
    ("100:0:0:1::/64", "Dummy IPv6 Prefix", "100:0:0:1::1", False),
    ("2001::/23", "IETF Protocol Assignments", "2001:1ff::1", False),
    ("2001::/32", "TEREDO", "2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ("2001:1::1/128", "Port Control Protocol Anycast (globally reachable; no image host)", "2001:1::1", False),
    ("2001:1::2/128", "TURN Anycast (globally reachable; no image host)", "2001:1::2", False),
    ("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast (globally reachable)", "2001:1::3", False),
    ("2001:2::/48", "Benchmarking", "2001:2::1", False),
    ("2001:3::/32", "AMT (globally reachable; inside 2001::/23)", "2001:3::1", False),
    ("2001:4:112::/48", "AS112-v6 (globally reachable; inside 2001::/23)", "2001:4:112::1", False),
    ("2001:10::/28", "Deprecated (previously ORCHID)", "2001:10::1", False),
    ("2001:20::/28", "ORCHIDv2 (identifiers, not locators)", "2001:20::1", False),
    ("2001:30::/28", "Drone Remote ID Protocol Entity Tags (identifiers)", "2001:30::1", False),
    ("2001:db8::/32", "Documentation", "2001:db8::1", False),
    ("2002::/16", "6to4 (judged by the IPv4 address)", "2002:c0a8:101::1", False),
    ("2620:4f:8000::/48", "Direct Delegation AS112 Service (globally reachable)", "2620:4f:8000::1", True),
    ("3fff::/20", "Documentation", "3fff:123::1", False),
    ("5f00::/16", "Segment Routing (SRv6) SIDs", "5f00::1", False),
    ("fc00::/7", "Unique-Local", "fd12:3456::1", False),
    ("fe80::/10", "Link-Local Unicast", "fe80::1", False),
    # Address-space registry blocks outside the special-purpose one.
    ("fec0::/10", "Deprecated site-local", "fec0::1", False),
    ("ff00::/8", "Multicast", "ff0e::1", False),
    ("::/96", "Deprecated IPv4-compatible (reserved ::/8)", "::127.0.0.1", False),
    ("4000::/3", "Reserved by IETF (outside 2000::/3)", "4000::1", False),
]

# Public unicast hosts and public addresses behind the embeddings that are judged by their IPv4 address.
PUBLIC = ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700::1111", "2a00:1450:4001::1",
          "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


def teredo(server: str, client: str) -> ipaddress.IPv6Address:
    """A Teredo address: 2001:0::/32, the server's IPv4 address, flags and port, the client's address inverted."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | (~int(ipaddress.IPv4Address(client)) & 0xFFFFFFFF)
    return ipaddress.IPv6Address(value)


@pytest.mark.parametrize(("block", "name", "sample", "allowed"), IPV4_SPECIAL + IPV6_SPECIAL,
                         ids=[row[0] for row in IPV4_SPECIAL + IPV6_SPECIAL])
def test_every_special_purpose_block(block, name, sample, allowed):
    address = ipaddress.ip_address(sample)
    assert address in ipaddress.ip_network(block), (sample, block)
    reason = blocked_reason(address)
    assert (reason is None) == allowed, f"{sample} ({block}, {name}): {reason}"


@pytest.mark.parametrize("sample", PUBLIC)
def test_public_unicast_is_allowed(sample):
    assert blocked_reason(ipaddress.ip_address(sample)) is None


@pytest.mark.parametrize("embedded", ["169.254.169.254", "100.100.100.200", "192.0.0.192", "127.0.0.1", "10.1.2.3",
                                      "192.0.0.8", "192.88.99.1"])
def test_ipv6_forms_of_a_refused_ipv4_address_are_refused(embedded):
    v4 = ipaddress.IPv4Address(embedded)
    forms = {
        "mapped": ipaddress.IPv6Address(f"::ffff:{embedded}"),
        "nat64": ipaddress.IPv6Address((int(ipaddress.IPv6Address("64:ff9b::")) | int(v4))),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1),
        "teredo client": teredo("65.54.227.120", embedded),
        "teredo server": teredo(embedded, "8.8.8.8"),
    }
    for form, address in forms.items():
        reason = blocked_reason(address)
        assert reason is not None and embedded in reason, (form, str(address), reason)


def test_metadata_addresses_are_named():
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "192.0.0.192"):
        assert blocked_reason(ipaddress.ip_address(address)) == "a cloud metadata address"


def test_teredo_with_public_addresses_is_still_refused():
    assert blocked_reason(teredo("65.54.227.120", "8.8.8.8")) is not None
