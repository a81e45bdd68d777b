"""Bearer-key authentication for the job API.

Keys come from `INFINITETALK_API_KEYS` (comma-separated) and/or the file named by
`INFINITETALK_API_KEYS_FILE` (one key per line, `#` comments). With no key configured the routes
fail closed: they answer only loopback clients whose request carries no proxy header (a reverse proxy
on the same machine makes every client look like loopback), unless `INFINITETALK_API_OPEN=1` says the
server is deliberately open to everyone.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from .contract import ApiError

ENV_KEYS = "INFINITETALK_API_KEYS"
ENV_KEYS_FILE = "INFINITETALK_API_KEYS_FILE"
ENV_OPEN = "INFINITETALK_API_OPEN"
# Headers a reverse proxy adds; their presence means `remote` is the proxy, not the client.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def load_keys(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The configured keys. A key file that is named but cannot be read raises RuntimeError (the routes then
    admit nobody), never silently "no key"; a readable file with only comments means no key yet."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(ENV_KEYS, "").split(",") if k.strip()]
    path = env.get(ENV_KEYS_FILE, "").strip()
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RuntimeError(f"{ENV_KEYS_FILE}={path}: cannot read the API key file ({exc})") from exc
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return tuple(keys)


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def open_access(environ: Mapping[str, str] | None = None) -> bool:
    """True when the operator set INFINITETALK_API_OPEN=1: no key needed when none is configured."""
    env = os.environ if environ is None else environ
    return env.get(ENV_OPEN, "").strip().lower() in ("1", "true", "yes")


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
