"""Webhooks: `?webhook=URL` on submit; when the job ends, the GET-result envelope is POSTed there.

Signed the way WaveSpeed signs: headers `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature: v3,<hex HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{raw body}">`, keyed
with the secret from `INFINITETALK_API_WEBHOOK_SECRET` without its `whsec_` prefix (used as text, not
base64-decoded). `webhook-id` is the job id, the same on every retry, so a receiver can drop repeats.

The URL is checked by the same guard as inputs (http/https, public addresses only; hosts named in
`INFINITETALK_API_ALLOW_HOSTS` are admitted: that is how tests reach 127.0.0.1) at submit and again
before every attempt, and the connection goes only to the addresses just checked. Delivery runs as a
background task: it never blocks the server loop and never raises into it. It is attempted at most once
per job across servers sharing a store (`mark_once(job_id, "webhook")`), retried on connection errors,
408, 429 and 5xx with exponential backoff inside a bounded total time; redirects are not followed.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .contract import ApiError
from .guard import check_url
from .inputs import InputSettings, _pinned_resolver
from .store import JobRecord

ENV_SECRET = "INFINITETALK_API_WEBHOOK_SECRET"
ENV_PUBLIC_URL = "INFINITETALK_API_PUBLIC_URL"  # base URL of result links in webhook bodies
SIGNATURE_VERSION = "v3"
MAX_AGE_S = 300  # what a receiver should accept (WaveSpeed's documented window)
MAX_URL_CHARS = 2048
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
log = logging.getLogger("infinitetalk.api")


def make_webhook_check(settings: InputSettings) -> Callable[[str], str]:
    """The submit-time check of a `webhook` URL (raises ApiError 400 naming it); returns the URL."""
    def check(url: str) -> str:
        if not isinstance(url, str) or not url.strip():
            raise ApiError(400, "query parameter 'webhook' must be an http(s) URL; got an empty value")
        url = url.strip()
        if len(url) > MAX_URL_CHARS:
            raise ApiError(400, f"query parameter 'webhook' is {len(url)} characters; at most {MAX_URL_CHARS}")
        decision = check_url(url, settings.allow_hosts, settings.resolver)
        if not decision.allowed:
            raise ApiError(400, f"query parameter 'webhook': URL refused: {decision.reason}")
        return url
    return check


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: WaveSpeed's `whsec_` prefix removed, the rest used as UTF-8 text."""
    return secret.removeprefix("whsec_").encode("utf-8")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v3,<hex>`: HMAC-SHA256 over `{id}.{timestamp}.{body}`."""
    mac = hmac.new(signing_key(secret), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION},{mac.hexdigest()}"


def signed_headers(secret: str, webhook_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {"Content-Type": "application/json", "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp), "webhook-signature": sign(secret, webhook_id, timestamp, body)}


@dataclass
class WebhookSettings:
    secret: str
    max_attempts: int = 8
    first_delay_s: float = 2.0     # then doubled per attempt (with jitter), at most max_delay_s
    max_delay_s: float = 120.0
    total_s: float = 900.0         # give up once this long has passed since the first attempt
    request_timeout_s: float = 15.0


def webhook_settings_from_env(environ: Mapping[str, str] | None = None) -> WebhookSettings | None:
    """The settings, or None when no secret is set (then `?webhook=` is refused at submit)."""
    env = os.environ if environ is None else environ
    secret = env.get(ENV_SECRET, "").strip()
    if not secret:
        return None
    if len(signing_key(secret)) < 16:
        raise RuntimeError(f"{ENV_SECRET}: the secret is {len(signing_key(secret))} characters (after any "
                           "'whsec_' prefix); expected at least 16 random characters")
    return WebhookSettings(secret=secret)


class WebhookSender:
    """Posts a finished job's envelope to its webhook; use `on_final` as JobService's `on_final` hook.

    `envelope_for(rec)` builds the body (the GET-result envelope); `webhook_of(rec)` says where to send.
    """

    def __init__(self, store: Any, settings: WebhookSettings, inputs: InputSettings,
                 envelope_for: Callable[[JobRecord], dict],
                 webhook_of: Callable[[JobRecord], str | None] = lambda rec: rec.webhook,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.settings = settings
        self.inputs = inputs
        self.envelope_for = envelope_for
        self.webhook_of = webhook_of
        self.sleep = sleep
        self.clock = clock
        self.tasks: set[asyncio.Task] = set()  # strong references until done
        self.attempts: dict[str, list[int | str]] = {}  # job id -> HTTP status or error name per attempt

    def on_final(self, rec: JobRecord) -> None:
        """Start delivery in the background (needs a running loop); never raises."""
        try:
            if not self.webhook_of(rec):
                return
            task = asyncio.get_running_loop().create_task(self.deliver(rec))
        except Exception:  # noqa: BLE001 - a webhook must never break the caller (a request handler)
            log.exception("webhook for job %s could not be started", rec.id)
            return
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def deliver(self, rec: JobRecord) -> bool:
        """Deliver once (across servers); True when a receiver answered 2xx. Never raises."""
        try:
            url = self.webhook_of(rec)
            if not url or not await asyncio.get_running_loop().run_in_executor(None, self.store.mark_once, rec.id,
                                                                                 "webhook"):
                return False
            body = json.dumps(self.envelope_for(rec), separators=(",", ":")).encode()
            return await self._attempts(rec.id, url, body)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("webhook for job %s failed unexpectedly", rec.id)
            return False

    async def _attempts(self, job_id: str, url: str, body: bytes) -> bool:
        s = self.settings
        deadline = self.clock() + s.total_s
        tried = self.attempts.setdefault(job_id, [])
        for attempt in range(s.max_attempts):
            outcome = await self._post_once(url, job_id, body)
            tried.append(outcome)
            if isinstance(outcome, int) and 200 <= outcome < 300:
                log.info("webhook for job %s delivered (HTTP %d, attempt %d)", job_id, outcome, attempt + 1)
                return True
            if outcome == "refused" or (isinstance(outcome, int) and outcome not in RETRY_STATUSES):
                log.warning("webhook for job %s not delivered: %s; not retried", job_id, outcome)
                return False
            delay = min(s.max_delay_s, s.first_delay_s * 2 ** attempt) * random.uniform(0.8, 1.0)
            if attempt + 1 >= s.max_attempts or self.clock() + delay > deadline:
                break
            await self.sleep(delay)
        log.warning("webhook for job %s given up after %d attempts (last: %s)", job_id, len(tried), tried[-1])
        return False

    async def _post_once(self, url: str, job_id: str, body: bytes) -> int | str:
        """One signed POST: the HTTP status, "refused" (guard) or the connection error's name."""
        import aiohttp

        loop = asyncio.get_running_loop()
        decision = await loop.run_in_executor(None, check_url, url, self.inputs.allow_hosts, self.inputs.resolver)
        if not decision.allowed:
            log.warning("webhook for job %s refused: %s", job_id, decision.reason)
            return "refused"
        headers = signed_headers(self.settings.secret, job_id, body)
        connector = aiohttp.TCPConnector(resolver=_pinned_resolver(decision.host, decision.addresses),
                                         use_dns_cache=False, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    await resp.read()
                    return resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return type(exc).__name__


def result_envelope_for(service: Any, environ: Mapping[str, str] | None = None) -> Callable[[JobRecord], dict]:
    """The webhook body builder: the GET-result envelope, links based on `INFINITETALK_API_PUBLIC_URL`
    or else on the origin the job was submitted to (kept in the job's request as `base_url`)."""
    from .contract import envelope

    env = os.environ if environ is None else environ

    def build(rec: JobRecord) -> dict:
        base = env.get(ENV_PUBLIC_URL, "").strip() or str(rec.request.get("base_url") or "")
        return envelope(service.describe(rec, base.rstrip("/")))
    return build
