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


def address_refusal(address: str) -> str | None:
    """Why `address` must not be fetched from, or None when it is a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"'{address}' is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for label, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                        ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                        ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if test:
            return f"{label} address {ip}"
    if not ip.is_global:
        return f"non-public address {ip}"
    return None


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
