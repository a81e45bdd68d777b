"""Which URLs the job API may fetch: http(s) only, and only hosts that resolve to public addresses.

The decision is separate from the fetching so it can be tested on given addresses without sending
any traffic. The fetcher then connects only to the addresses that were checked (no second DNS
lookup an attacker could rebind to an internal address).
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Resolver = Callable[[str, int], list[str]]


@dataclass
class GuardDecision:
    allowed: bool
    reason: str
    scheme: str = ""
    host: str = ""
    port: int = 0
    addresses: list[str] = field(default_factory=list)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses a transition-mechanism IPv6 address leads to: (mechanism, address) pairs.

    Covers IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96), NAT64 (64:ff9b::/96 and the local-use
    64:ff9b:1::/48), 6to4 (2002::/16) and Teredo (2001::/32, server and de-obfuscated client).
    """
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    elif ip in _IPV4_COMPATIBLE and int(ip) > 1:
        found.append(("IPv4-compatible", low32))
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        found.append(("NAT64", low32))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo server", server), ("Teredo client", client)]
    return found


_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def _plain_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for label, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                        ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                        ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if test:
            return f"{label} address {ip}"
    if not ip.is_global:
        return f"non-public address {ip}"
    return None


def address_refusal(address: str) -> str | None:
    """Why `address` must not be fetched from, or None when it is a public unicast address.

    An IPv6 address that embeds an IPv4 one (mapped, NAT64, 6to4, Teredo) is judged by the IPv4
    address it leads to as well, so e.g. 2002:0a00:0001:: (6to4 for 10.0.0.1) is refused.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"'{address}' is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = embedded_ipv4(ip)
        for mechanism, v4 in embedded:
            refusal = _plain_refusal(v4)
            if refusal:
                return f"{refusal} (embedded in {mechanism} address {ip})"
        if embedded and embedded[0][0] in ("IPv4-mapped", "NAT64"):
            return None  # the public IPv4 address it leads to was checked above
    return _plain_refusal(ip)


def _host_allowed(host: str, port: int, allow_hosts: Iterable[str]) -> bool:
    host = host.lower()
    for entry in allow_hosts:
        entry = entry.strip().lower()
        if entry and (entry == host or entry == f"{host}:{port}"):
            return True
    return False


def check_url(url: str, allow_hosts: Iterable[str] = (), resolver: Resolver = system_resolver) -> GuardDecision:
    """Decide whether `url` may be fetched. `allow_hosts` admits named hosts (e.g. a test server)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return GuardDecision(False, f"malformed URL ({exc})")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return GuardDecision(False, f"scheme '{scheme or '(none)'}' is not allowed; use https (or http)")
    host = parts.hostname or ""
    if not host:
        return GuardDecision(False, "URL has no host")
    if parts.username or parts.password:
        return GuardDecision(False, "URLs with credentials are not allowed")
    port = port or (443 if scheme == "https" else 80)
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        return GuardDecision(False, f"host '{host}' does not resolve ({exc})", scheme, host, port)
    if not addresses:
        return GuardDecision(False, f"host '{host}' does not resolve", scheme, host, port)
    if _host_allowed(host, port, allow_hosts):
        return GuardDecision(True, "host is on the allow-list", scheme, host, port, list(addresses))
    for address in addresses:
        refusal = address_refusal(address)
        if refusal:
            return GuardDecision(False, f"host '{host}' resolves to a {refusal}; only public addresses may be fetched",
                                 scheme, host, port, list(addresses))
    return GuardDecision(True, "public address", scheme, host, port, list(addresses))
