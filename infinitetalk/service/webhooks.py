"""Webhooks: `?webhook=URL` on submit; when the job ends, the job is POSTed there.

Two styles (`INFINITETALK_API_WEBHOOK_STYLE`; settings.py reads and checks it and the secret):
* `wavespeed` (default): the body is WaveSpeed's flat prediction object (`compat.prediction_object`), signed
  as WaveSpeed signs: `webhook-signature: v3,<hex HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{raw body}">`
  keyed with the secret from `INFINITETALK_API_WEBHOOK_SECRET` without its `whsec_` prefix, used as text;
* `standard`: Standard Webhooks (the `standardwebhooks` library's verifier): the body is the contract routes'
  GET-result envelope, `webhook-signature: v1,<base64 HMAC-SHA256 of the same string>` keyed with the secret's
  base64-decoded bytes (`whsec_<base64>`).
Both send `webhook-id` (the job id, the same on every retry, so a receiver can drop repeats) and
`webhook-timestamp` (Unix seconds).

The URL is checked by the same guard as inputs (http/https, public addresses only; hosts named in
`INFINITETALK_API_ALLOW_HOSTS` are admitted: that is how tests reach 127.0.0.1) at submit and again
before every attempt, and the connection goes only to the addresses just checked. Redirects are not
followed. Retries on connection errors, 408, 425, 429 and 5xx, with exponential backoff inside a bounded
total time. The status decides; of a receiver's answer body at most `ANSWER_BYTES` are read (for the log),
within `ANSWER_READ_S`, then the connection is closed: a receiver answering gigabytes costs nothing.

Delivery is at least once across a fleet: a server claims the job's delivery in the job store under a
lease it extends before every attempt and every wait (`claim_event` / `hold_event`), and records the end
(`end_event`). Servers sharing the store never deliver one job at the same time. A server that dies
mid-retries (or right after recording the job's end) leaves the delivery due; every server's sweep
(`run`) takes due ones up once their lease runs out and carries on with the tries and the deadline
where they were. Delivery runs as background tasks: it never blocks the server loop or raises into it.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .compat import prediction_object
from .contract import ApiError, envelope
from .guard import check_url
from .inputs import InputSettings, _pinned_resolver
from .store import JobRecord, StoreUnavailable

STYLES = ("wavespeed", "standard")   # INFINITETALK_API_WEBHOOK_STYLE (settings.py)
SIGNATURE_VERSION = "v3"
MAX_AGE_S = 300  # what a receiver should accept (WaveSpeed's documented window)
MAX_URL_CHARS = 2048
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
EVENT = "webhook"
MAX_LATE_S = 24 * 3600  # a job that ended longer ago than this is not swept up any more
ANSWER_BYTES = 4096     # read of a receiver's answer body, at most
ANSWER_READ_S = 2.0     # and for at most this long
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


def signing_key(secret: str, style: str = "wavespeed") -> bytes:
    """The HMAC key of a secret, `whsec_` prefix removed: WaveSpeed uses the rest as UTF-8 text, Standard
    Webhooks base64-decodes it (ValueError when it is not base64)."""
    rest = secret.removeprefix("whsec_")
    if style == "standard":
        return base64.b64decode(rest + "=" * (-len(rest) % 4), validate=True)
    return rest.encode("utf-8")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes, style: str = "wavespeed") -> str:
    """HMAC-SHA256 over `{id}.{timestamp}.{body}`: `v3,<hex>` (WaveSpeed) or `v1,<base64>` (Standard Webhooks)."""
    mac = hmac.new(signing_key(secret, style), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    if style == "standard":
        return "v1," + base64.b64encode(mac.digest()).decode()
    return f"{SIGNATURE_VERSION},{mac.hexdigest()}"


def signed_headers(secret: str, webhook_id: str, body: bytes, now: float | None = None,
                   style: str = "wavespeed") -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {"Content-Type": "application/json", "webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, webhook_id, timestamp, body, style)}


@dataclass
class WebhookSettings:
    secret: str
    style: str = "wavespeed"       # signature and body: see the module docstring
    max_attempts: int = 8
    first_delay_s: float = 2.0     # then doubled per attempt (with jitter), at most max_delay_s
    max_delay_s: float = 120.0
    total_s: float = 900.0         # give up once this long has passed since the first attempt
    request_timeout_s: float = 15.0
    lease_s: float = 60.0          # how long past its next step a silent server keeps a delivery
    sweep_s: float = 15.0          # how often a server looks for deliveries that are due
    max_in_flight: int = 16        # deliveries one server runs at a time


class WebhookSender:
    """Posts a finished job (`body_for`) to its webhook; use `on_final` as JobService's `on_final` hook and
    run `run()` beside the server (the sweep for deliveries another server left unfinished).

    `body_for(rec)` builds the body (`webhook_body_for`); `webhook_of(rec)` says where to send.
    `clock` is wall time (the first try's time is kept in the store and read by other servers).
    """

    def __init__(self, store: Any, settings: WebhookSettings, inputs: InputSettings,
                 body_for: Callable[[JobRecord], dict],
                 webhook_of: Callable[[JobRecord], str | None] = lambda rec: rec.webhook,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.time, owner: str | None = None):
        self.store = store
        self.settings = settings
        self.inputs = inputs
        self.body_for = body_for
        self.webhook_of = webhook_of
        self.sleep = sleep
        self.clock = clock
        self.owner = owner or f"webhooks:{uuid.uuid4().hex[:12]}"
        self.tasks: dict[str, asyncio.Task] = {}  # job id -> its delivery here (strong references until done)
        self.attempts: dict[str, list[int | str]] = {}  # job id -> HTTP status or error name per attempt here
        self.answer_bytes = 0  # bytes of answer bodies read here, all deliveries together
        self._stopping = asyncio.Event()

    def on_final(self, rec: JobRecord) -> None:
        """Start delivery in the background (needs a running loop); never raises."""
        try:
            if self.webhook_of(rec) and rec.id not in self.tasks:
                self._start(rec)
        except Exception:  # noqa: BLE001 - a webhook must never break the caller (a request handler)
            log.exception("webhook for job %s could not be started", rec.id)

    def _start(self, rec: JobRecord) -> None:
        task = asyncio.get_running_loop().create_task(self.deliver(rec))
        self.tasks[rec.id] = task
        task.add_done_callback(lambda _t, job_id=rec.id: self.tasks.pop(job_id, None))

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)

    async def sweep(self) -> int:
        """Start the deliveries that are due (never started, or left by a server that stopped); how many."""
        room = self.settings.max_in_flight - len(self.tasks)
        if room <= 0:
            return 0
        since = datetime.fromtimestamp(self.clock() - MAX_LATE_S, timezone.utc).isoformat(timespec="milliseconds")
        due = await self._db(self.store.webhooks_due, since.replace("+00:00", "Z"), room)
        started = 0
        for rec in due:
            if rec.id not in self.tasks and self.webhook_of(rec):
                self._start(rec)
                started += 1
        return started

    async def run(self) -> None:
        """Sweep every `sweep_s` until `stop()`; database trouble is logged and retried."""
        while not self._stopping.is_set():
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("webhook sweep: %s; retrying", exc)
            except Exception:  # noqa: BLE001 - the sweep must outlive any one delivery's trouble
                log.exception("webhook sweep failed")
            try:
                await asyncio.wait_for(self._stopping.wait(), self.settings.sweep_s)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping.set()

    async def _db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def deliver(self, rec: JobRecord) -> bool:
        """Deliver (one server at a time); True when a receiver answered 2xx. Never raises."""
        try:
            url = self.webhook_of(rec)
            if not url:
                return False
            claimed = await self._db(self.store.claim_event, rec.id, EVENT, self.owner, self._lease())
            if claimed is None:   # done, or another server is on it
                return False
            tries, first_try_at = claimed
            if tries:
                log.info("webhook for job %s taken over after %d attempts elsewhere", rec.id, tries)
            body = json.dumps(self.body_for(rec), separators=(",", ":")).encode()
            outcome = await self._attempts(rec.id, url, body, tries, first_try_at)
            if outcome is None:   # another server took it over (this one was too slow to extend the lease)
                return False
            await self._db(self.store.end_event, rec.id, EVENT, self.owner, outcome)
            return outcome == "delivered"
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:   # the lease runs out; a sweep carries on once the database is back
            log.warning("webhook for job %s paused: %s", rec.id, exc)
            return False
        except Exception:  # noqa: BLE001
            log.exception("webhook for job %s failed unexpectedly", rec.id)
            return False

    def _lease(self, wait_s: float = 0.0) -> float:
        return wait_s + self.settings.request_timeout_s + self.settings.lease_s

    async def _attempts(self, job_id: str, url: str, body: bytes, tries: int, first_try_at: float | None) -> str | None:
        """Attempts from number `tries` on: "delivered", "gave up …", "not retried: …", or None (taken over)."""
        s = self.settings
        first = self.clock() if first_try_at is None else first_try_at
        deadline = first + s.total_s
        tried = self.attempts.setdefault(job_id, [])
        made = tries   # attempts so far, on any server
        for attempt in range(tries, s.max_attempts):
            if self.clock() > deadline:   # a delivery taken over late: its time may be up already
                break
            if not await self._db(self.store.hold_event, job_id, EVENT, self.owner, self._lease(), attempt + 1, first):
                return None
            outcome = await self._post_once(url, job_id, body)
            tried.append(outcome)
            made += 1
            if isinstance(outcome, int) and 200 <= outcome < 300:
                log.info("webhook for job %s delivered (HTTP %d, attempt %d)", job_id, outcome, attempt + 1)
                return "delivered"
            if outcome == "refused" or (isinstance(outcome, int) and outcome not in RETRY_STATUSES):
                log.warning("webhook for job %s not delivered: %s; not retried", job_id, outcome)
                return f"not retried: {outcome}"
            delay = min(s.max_delay_s, s.first_delay_s * 2 ** attempt) * random.uniform(0.8, 1.0)
            if attempt + 1 >= s.max_attempts or self.clock() + delay > deadline:
                break
            if not await self._db(self.store.hold_event, job_id, EVENT, self.owner, self._lease(delay), attempt + 1, first):
                return None
            await self.sleep(delay)
        last = tried[-1] if tried else "no attempt left in its time"
        log.warning("webhook for job %s given up after %d attempts (last: %s)", job_id, made, last)
        return f"gave up after {made} attempts: {last}"

    async def _post_once(self, url: str, job_id: str, body: bytes) -> int | str:
        """One signed POST: the HTTP status, "refused" (guard) or the connection error's name."""
        import aiohttp

        loop = asyncio.get_running_loop()
        decision = await loop.run_in_executor(None, check_url, url, self.inputs.allow_hosts, self.inputs.resolver)
        if not decision.allowed:
            log.warning("webhook for job %s refused: %s", job_id, decision.reason)
            return "refused"
        headers = signed_headers(self.settings.secret, job_id, body, style=self.settings.style)
        connector = aiohttp.TCPConnector(resolver=_pinned_resolver(decision.host, decision.addresses),
                                         use_dns_cache=False, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                    answer = await read_answer(resp.content)
                    self.answer_bytes += len(answer)
                    if not 200 <= resp.status < 300:
                        log.info("webhook for job %s: HTTP %d %r", job_id, resp.status, answer[:200])
                    return resp.status   # leaving the block closes the connection: the rest is never read
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return type(exc).__name__


async def read_answer(content: Any, limit: int = ANSWER_BYTES, within_s: float = ANSWER_READ_S) -> bytes:
    """At most `limit` bytes of an answer body (aiohttp's StreamReader), for at most `within_s` seconds;
    whatever came by then (the status is already known, so a slow or endless body is no error)."""
    got = b""
    deadline = time.monotonic() + within_s
    try:
        while len(got) < limit:
            chunk = await asyncio.wait_for(content.read(limit - len(got)), max(0.0, deadline - time.monotonic()))
            if not chunk:
                break
            got += chunk
    except Exception as exc:  # noqa: BLE001 - a broken answer body changes nothing
        log.debug("webhook answer body not read to its end: %s", type(exc).__name__)
    return got


def webhook_body_for(service: Any, public_url: str = "", style: str = "wavespeed") -> Callable[[JobRecord], dict]:
    """The webhook body builder: WaveSpeed's flat prediction object, or with the `standard` style the contract's
    GET-result envelope; links based on `public_url` (`INFINITETALK_API_PUBLIC_URL`) or else on the origin the
    job was submitted to (kept in the job's request as `base_url`)."""
    def build(rec: JobRecord) -> dict:
        base = (public_url.strip() or str(rec.request.get("base_url") or "")).rstrip("/")
        if style == "standard":
            return envelope(service.describe(rec, base))
        return prediction_object(service, rec, base)
    return build
