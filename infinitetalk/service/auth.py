"""Bearer-key authentication for the job API.

Keys come from `INFINITETALK_API_KEYS` (comma-separated) and/or the file named by
`INFINITETALK_API_KEYS_FILE` (one key per line, `#` comments). With no key configured the routes
answer only clients on the loopback interface.
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


def load_keys(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(ENV_KEYS, "").split(",") if k.strip()]
    path = env.get(ENV_KEYS_FILE, "").strip()
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
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


def authorize(authorization: str | None, remote: str | None, keys: tuple[str, ...]) -> None:
    """Raise ApiError(401) unless the request may use the API."""
    if not keys:
        if is_loopback(remote):
            return
        raise ApiError(401, "no API key is configured on this server, so the API answers only loopback clients")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'")
    token = token.strip().encode()
    if not any(hmac.compare_digest(token, k.encode()) for k in keys):
        raise ApiError(401, "invalid API key")
