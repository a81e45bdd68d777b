"""The URL guard decides on given addresses: no traffic to private or public hosts is ever sent."""
from __future__ import annotations

import pytest

from infinitetalk.service.guard import address_refusal, check_url


def fixed(*addresses):
    return lambda host, port: list(addresses)


@pytest.mark.parametrize("address,kind", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.9", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("::ffff:10.0.0.1", "private"), ("100.64.0.1", "non-public"), ("fc00::5", "private"),
])
def test_internal_addresses_refused(address, kind):
    reason = address_refusal(address)
    assert reason is not None and kind in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"])
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


def test_scheme_refused_before_resolving():
    called = []
    for url in ("file:///etc/passwd", "ftp://example.com/a.wav", "gopher://x/", "javascript:alert(1)"):
        d = check_url(url, resolver=lambda h, p: called.append(h) or ["93.184.216.34"])
        assert not d.allowed and "scheme" in d.reason
    assert called == []


def test_host_resolving_to_private_is_refused_even_if_one_address_is_public():
    d = check_url("https://media.example/a.wav", resolver=fixed("93.184.216.34", "10.0.0.7"))
    assert not d.allowed and "private" in d.reason and "media.example" in d.reason


def test_public_host_allowed_and_addresses_kept_for_pinning():
    d = check_url("https://media.example:8443/a.wav", resolver=fixed("93.184.216.34"))
    assert d.allowed and d.addresses == ["93.184.216.34"] and d.port == 8443 and d.host == "media.example"


def test_allow_list_admits_named_host_only():
    assert check_url("http://127.0.0.1:9/x", allow_hosts=["127.0.0.1"], resolver=fixed("127.0.0.1")).allowed
    assert check_url("http://127.0.0.1:9/x", allow_hosts=["127.0.0.1:9"], resolver=fixed("127.0.0.1")).allowed
    assert not check_url("http://localhost:9/x", allow_hosts=["127.0.0.1"], resolver=fixed("127.0.0.1")).allowed


def test_unresolvable_and_credential_urls_refused():
    def boom(host, port):
        raise OSError("no such host")
    assert "does not resolve" in check_url("https://nope.invalid/x", resolver=boom).reason
    assert not check_url("https://user:pw@media.example/x", resolver=fixed("93.184.216.34")).allowed


# IPv6 addresses that lead to an IPv4 address: each is judged by the IPv4 address it embeds.
@pytest.mark.parametrize("address,embedded,mechanism", [
    ("::ffff:192.168.0.5", "192.168.0.5", "IPv4-mapped"),
    ("::10.0.0.1", "10.0.0.1", "IPv4-compatible"),
    ("64:ff9b::10.0.0.1", "10.0.0.1", "NAT64"),
    ("64:ff9b::169.254.169.254", "169.254.169.254", "NAT64"),
    ("64:ff9b:1::a00:1", "10.0.0.1", "NAT64"),
    ("2002:0a00:0001::1", "10.0.0.1", "6to4"),
    ("2002:7f00:1::", "127.0.0.1", "6to4"),
    ("2002:a9fe:a9fe::1", "169.254.169.254", "6to4"),
    # Teredo: server 65.54.227.120, client 10.0.0.1 stored bit-inverted (0xf5ff_fffe)
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "10.0.0.1", "Teredo client"),
])
def test_ipv4_embedded_in_ipv6_is_judged_by_the_ipv4_address(address, embedded, mechanism):
    reason = address_refusal(address)
    assert reason is not None and embedded in reason and mechanism in reason, reason
    d = check_url("https://media.example/a.wav", resolver=fixed(address))
    assert not d.allowed and embedded in d.reason


@pytest.mark.parametrize("address", ["64:ff9b::8.8.8.8", "::ffff:93.184.216.34"])
def test_translated_public_ipv4_passes(address):
    assert address_refusal(address) is None


def test_6to4_of_a_public_ipv4_is_not_refused_for_its_embedding():
    reason = address_refusal("2002:5db8:d822::1")  # 93.184.216.34
    assert reason is None or "embedded" not in reason
