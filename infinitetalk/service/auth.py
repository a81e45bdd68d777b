"""Bearer-key authentication for the job API.

Keys come from `INFINITETALK_API_KEYS`, `INFINITETALK_API_ADMIN_KEYS` and/or `INFINITETALK_API_KEYS_FILE`
(settings.KeySource); each key belongs to an account, and a request sees only its account's jobs (an admin key
sees all). With no key configured the routes fail closed: they answer only loopback clients whose request
carries no proxy header (a reverse proxy on the same machine makes every client look like loopback), unless
`INFINITETALK_API_OPEN=1` says the server is deliberately open to everyone.
"""
from __future__ import annotations

import contextvars
import hmac
import ipaddress
from dataclasses import dataclass

from .contract import ApiError
from .settings import ENV_KEYS, ENV_KEYS_FILE, ENV_OPEN, ApiKey

# Headers a reverse proxy adds; their presence means `remote` is the proxy, not the client.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its account (`""` on a server without keys: one user) and whether it sees every
    account's jobs; `idempotency_key` is the request's `Idempotency-Key` header."""
    account: str = ""
    admin: bool = True
    idempotency_key: str | None = None


# The caller of the request being handled (set when the request is admitted, read by the job service);
# outside a request (a worker, a test calling the service) it is the unrestricted default.
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("infinitetalk_api_caller", default=Caller())


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
              proxied: bool = False, is_open: bool = False) -> Caller:
    """Who the request comes from; ApiError(401) unless it may use the API.

    `proxied`: the request carries a proxy header, so `remote` says nothing about the real client.
    """
    if not keys:
        if is_open:
            return Caller()
        if is_loopback(remote) and not proxied:
            return Caller()
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
    for key in keys:
        if hmac.compare_digest(token_bytes, key.encode("utf-8")):
            key = key if isinstance(key, ApiKey) else ApiKey(key)
            return Caller(account=key.account, admin=key.admin)
    raise ApiError(401, "invalid API key")
