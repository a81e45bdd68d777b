"""Bearer-key authentication for the job API.

Keys come from `INFINITETALK_API_KEYS` and/or `INFINITETALK_API_KEYS_FILE` (settings.KeySource). With no key configured the routes
fail closed: they answer only loopback clients whose request carries no proxy header (a reverse proxy
on the same machine makes every client look like loopback), unless `INFINITETALK_API_OPEN=1` says the
server is deliberately open to everyone.
"""
from __future__ import annotations

import hmac
import ipaddress

from .contract import ApiError
from .settings import ENV_KEYS, ENV_KEYS_FILE, ENV_OPEN

# Headers a reverse proxy adds; their presence means `remote` is the proxy, not the client.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def access_summary(keys: tuple[str, ...], is_open: bool) -> str:
    """One line for the server log saying who may use the API (logged at start)."""
    if keys:
        return f"InfiniteTalk job API: Bearer keys required ({len(keys)} configured)"
    if is_open:
        return (f"InfiniteTalk job API: no API key configured and {ENV_OPEN}=1, so ANYONE who can reach this "
                "server may submit jobs")
    return (f"InfiniteTalk job API: no API key configured ({ENV_KEYS} / {ENV_KEYS_FILE}); it answers only "
            f"loopback clients without proxy headers ({', '.join(PROXY_HEADERS)}). Set a key to serve "
            f"other machines, or {ENV_OPEN}=1 to open it deliberately")


def authorize(authorization: str | None, remote: str | None, keys: tuple[str, ...],
              proxied: bool = False, is_open: bool = False) -> None:
    """Raise ApiError(401) unless the request may use the API.

    `proxied`: the request carries a proxy header, so `remote` says nothing about the real client.
    """
    if not keys:
        if is_open:
            return
        if is_loopback(remote) and not proxied:
            return
        if proxied:
            raise ApiError(401, "no API key is configured on this server and the request came through a proxy "
                                f"({'/'.join(PROXY_HEADERS)} header), so it is refused; configure "
                                f"{ENV_KEYS} on the server")
        raise ApiError(401, "no API key is configured on this server, so the API answers only loopback clients")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'")
    try:
        token_bytes = token.strip().encode("utf-8")
    except UnicodeEncodeError:  # undecodable header bytes arrive as surrogates
        raise ApiError(401, "invalid API key: the Authorization header holds bytes that are not text") from None
    if not any(hmac.compare_digest(token_bytes, k.encode("utf-8")) for k in keys):
        raise ApiError(401, "invalid API key")
