"""Stand-ins for the interfaces the fleet branch adds to jobs.py / store.py / outputs.py.

The integration replaces this module: `EdgeJobService` by JobService's own `on_final`, `webhook`,
`webhook_check` and `outputs` arguments, `mark_once` by `store.mark_once`, `LocalViewOutputs` by
outputs.py. Kept apart so this branch never edits those files; the side tables live in the same
SQLite file as the jobs, so two services over one file share them (as workers over one database do).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from .jobs import FINAL, Engine, JobService
from .inputs import InputSettings
from .store import JobRecord, JobStore

log = logging.getLogger("infinitetalk.api")
_SIDE = """
CREATE TABLE IF NOT EXISTS edge_marks (job_id TEXT NOT NULL, event TEXT NOT NULL, PRIMARY KEY (job_id, event));
CREATE TABLE IF NOT EXISTS edge_webhooks (job_id TEXT PRIMARY KEY, url TEXT NOT NULL, base_url TEXT NOT NULL DEFAULT '');
"""


class OutputStore(Protocol):
    def publish(self, job_id: str, engine_outputs: list[dict]) -> list[dict]: ...
    def urls(self, outputs: list[dict], base_url: str) -> list[str]: ...


class OutputPublishError(Exception):
    """Publishing a finished job's video failed; the message is shown to the client as the job's error."""


def view_url(item: dict, base_url: str) -> str:
    """ComfyUI's `/view` URL of an output item (today's behaviour)."""
    query = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                       "type": item.get("type", "output")})
    return f"{base_url.rstrip('/')}/view?{query}"


class LocalViewOutputs:
    """Outputs stay in ComfyUI's output folder and are served by `/view`."""

    def publish(self, job_id: str, engine_outputs: list[dict]) -> list[dict]:
        return list(engine_outputs)

    def urls(self, outputs: list[dict], base_url: str) -> list[str]:
        return [view_url(o, base_url) for o in outputs]


def _side_tables(store: JobStore) -> None:
    if not getattr(store, "_edge_tables", False):
        with store._lock:
            store._db.executescript(_SIDE)
        store._edge_tables = True


def mark_once(store: Any, job_id: str, event: str) -> bool:
    """True only the first time (job_id, event) is marked, across every store on the same database."""
    own = getattr(store, "mark_once", None)
    if own is not None:
        return bool(own(job_id, event))
    _side_tables(store)
    with store._lock:
        cur = store._db.execute("INSERT OR IGNORE INTO edge_marks (job_id, event) VALUES (?, ?)", (job_id, event))
        return cur.rowcount == 1


class EdgeJobService(JobService):
    """JobService plus the fleet interfaces this branch codes against (see module docstring)."""

    def __init__(self, store: JobStore, engine: Engine, settings: InputSettings, workflows: dict[str, dict], *,
                 outputs: OutputStore | None = None,
                 on_final: Callable[[JobRecord], Awaitable[None] | None] | None = None,
                 webhook_check: Callable[[str], str] | None = None):
        super().__init__(store, engine, settings, workflows)
        self.outputs = outputs or LocalViewOutputs()
        self.on_final = on_final
        self.webhook_check = webhook_check
        _side_tables(store)

    async def submit(self, kind: str, body: Any, webhook: str | None = None, base_url: str = "") -> JobRecord:
        """Submit; a `webhook` is checked before anything is fetched and stored with the job."""
        if webhook is not None:
            if self.webhook_check is None:
                from .contract import ApiError
                from .webhooks import ENV_SECRET

                raise ApiError(400, f"query parameter 'webhook': this server sends no webhooks ({ENV_SECRET} "
                                    "is not set)")
            webhook = self.webhook_check(webhook)
        rec = await super().submit(kind, body)
        if webhook:
            with self.store._lock:
                self.store._db.execute("INSERT OR REPLACE INTO edge_webhooks VALUES (?, ?, ?)",
                                       (rec.id, webhook, base_url))
        return rec

    def webhook_of(self, rec: JobRecord) -> str | None:
        row = self._webhook_row(rec.id)
        return row[0] if row else None

    def submit_base_url(self, rec: JobRecord) -> str:
        row = self._webhook_row(rec.id)
        return row[1] if row else ""

    def _webhook_row(self, job_id: str) -> tuple[str, str] | None:
        with self.store._lock:
            return self.store._db.execute("SELECT url, base_url FROM edge_webhooks WHERE job_id = ?",
                                          (job_id,)).fetchone()

    def refresh(self, job_id: str) -> JobRecord:
        before = self.get(job_id)
        rec = super().refresh(job_id)
        if before.status in FINAL or rec.status not in FINAL:
            return rec
        if rec.status == "completed":
            try:
                published = self.outputs.publish(rec.id, rec.outputs)
            except OutputPublishError as exc:
                log.error("job %s: publishing the output failed: %s", rec.id, exc)
                self.store.update(job_id, status="failed", outputs=[], error=str(exc))
            else:
                self.store.update(job_id, outputs=published)
            rec = self.get(job_id)
        self._final(rec)
        return rec

    def cancel(self, job_id: str) -> JobRecord:
        rec = super().cancel(job_id)
        self._final(rec)
        return rec

    def _final(self, rec: JobRecord) -> None:
        if self.on_final is None:
            return
        try:
            result = self.on_final(rec)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)
        except Exception:  # noqa: BLE001 - a hook never breaks status reads
            log.exception("on_final hook failed for job %s", rec.id)

    def describe(self, rec: JobRecord, base_url: str) -> dict[str, Any]:  # type: ignore[override]
        data = JobService.describe(rec, base_url)
        data["outputs"] = self.outputs.urls(rec.outputs, base_url)
        return data


def output_path(output_dir: Path, item: dict) -> Path:
    """The file of an output item, refusing names that leave the output folder."""
    root = Path(output_dir).resolve()
    target = (root / item.get("subfolder", "") / item["filename"]).resolve()
    if root not in target.parents:
        raise OutputPublishError(f"output {item.get('filename')!r} is not inside the output folder")
    return target


def build_edge_service(store: JobStore, engine: Engine, settings: InputSettings, workflows: dict[str, dict],
                       output_dir: Path, environ: dict[str, str] | None = None) -> EdgeJobService:
    """The service with S3 outputs and webhooks as the environment configures them (what
    `register_with_comfyui` should build); RuntimeError naming a bad setting."""
    from .s3 import s3_outputs_from_env
    from .webhooks import WebhookSender, make_webhook_check, result_envelope_for, webhook_settings_from_env

    service = EdgeJobService(store, engine, settings, workflows, outputs=s3_outputs_from_env(output_dir, environ))
    hooks = webhook_settings_from_env(environ)
    if hooks is not None:
        sender = WebhookSender(store, hooks, settings, result_envelope_for(service, environ), service.webhook_of)
        service.on_final, service.webhook_check = sender.on_final, make_webhook_check(settings)
        service.webhook_sender = sender
    return service
