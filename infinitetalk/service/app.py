"""The job API's composition root: settings → job store, engine, worker, webhooks, S3 → routes, registered on
ComfyUI's server. Nothing else in the service builds these parts or reads the environment."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .auth import access_summary
from .inputs import InputSettings
from .jobs import Engine, JobService
from .outputs import LocalOutputs
from .routes import PREFIX, JobApi, refusing_routes
from .s3 import S3Outputs
from .settings import ENV_DATABASE_URL, ENV_SWITCH, ENV_WORKER, ENV_WORKFLOWS, ApiSettings, api_enabled, read_settings
from .staging import S3Inputs
from .store import JobStore
from .uploads import UploadSweeper
from .webhooks import WebhookSender, make_webhook_check, webhook_body_for
from .worker import Worker

WORKFLOW_FILES = {
    "image-to-video-multi": "infinitetalk_multi_image_api.json",
    "video-to-video-multi": "infinitetalk_multi_video_api.json",
}
MISCONFIGURED = ("the job API is not running: the server setting {names} is wrong, so no request is admitted; "
                 "the operator has to fix it and restart the server (the server log says what is wrong)")
OFF = (f"InfiniteTalk job API off (only the nodes are served): set {ENV_SWITCH}=1, an API key or a database URL "
       "to serve it (docs/api.md)")
log = logging.getLogger("infinitetalk.api")


@dataclass
class JobApp:
    """One server's job API: the service, its worker (None on an API-only server) and webhook sender (None
    without a signing secret)."""
    settings: ApiSettings
    service: JobService
    worker: Worker | None
    webhooks: WebhookSender | None

    def api(self, folders: dict[str, Path] | None = None) -> JobApi:
        """The request handlers (`folders`: label -> path, hidden in messages)."""
        return JobApi(self.service, keys=self.settings.keys.load, is_open=lambda: self.settings.open,
                      worker=self.worker, folders=folders, sync_wait_s=self.settings.sync_wait_s)


def build(settings: ApiSettings, open_db: Callable[[], JobStore], engine: Engine, inputs: InputSettings,
          workflows: dict[str, dict], output_dir: Path) -> JobApp:
    """Wire the parts (the job database, `open_db()`, is opened last: a bad setting leaves nothing behind)."""
    outputs = S3Outputs(settings.s3, output_dir) if settings.s3 else LocalOutputs(output_dir)
    staging = S3Inputs(settings.s3) if settings.s3_inputs else None
    store = open_db()
    worker: Worker | None = None

    async def local_cancel(job_id: str) -> None:   # the worker is made below, from the service
        if worker is not None:
            await worker.cancel_if_mine(job_id)
    sender = None
    if settings.webhooks is not None:   # webhooks only with a signing secret: receivers must be able to verify them
        sender = WebhookSender(store, settings.webhooks, inputs, lambda rec: body_of(rec))
    service = JobService(store, engine, inputs, workflows, outputs=outputs, staging=staging,
                         on_final=sender.on_final if sender else None,
                         webhook_check=make_webhook_check(inputs) if sender else None, local_cancel=local_cancel,
                         max_queued=settings.max_queued, upload_sweeper=UploadSweeper(inputs, settings.upload_quota))
    body_of = webhook_body_for(service, settings.public_url, settings.webhooks.style) if settings.webhooks else None
    if settings.run_worker:
        worker = Worker(service, lease_s=settings.lease_s)
    return JobApp(settings, service, worker, sender)


def load_workflows(folder: Path) -> dict[str, dict]:
    out = {}
    for kind, name in WORKFLOW_FILES.items():
        graph = json.loads((folder / name).read_text())
        out[kind] = graph.get("prompt", graph)
    return out


def misconfigured_message(exc: Exception) -> str:
    """The clients' sentence for a bad setting: the setting's name, not its value (that may be a secret)."""
    names = sorted(set(re.findall(r"INFINITETALK_API(?:_[A-Z0-9_]+)?", str(exc))))
    return MISCONFIGURED.format(names=", ".join(names) or "(see the log)")


def register_with_comfyui() -> bool:
    """Serve the job API from the running ComfyUI server when it is configured (no-op outside ComfyUI).
    Returns True if the routes were added.

    Not configured: one INFO line, no routes, no worker, no database file. A bad setting (RuntimeError naming
    it) is logged once and every API path answers 503 saying which setting; the custom nodes load either way."""
    try:
        import folder_paths
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    try:
        if not api_enabled():
            log.info(OFF)
            return False
        app, folders = _app_for_comfyui(server, folder_paths)
    except RuntimeError as exc:
        log.error("InfiniteTalk job API not started: %s", exc)
        for route in refusing_routes(misconfigured_message(exc)):
            server.routes.route(route.method, route.path)(route.handler)
        return False
    for route in app.api(folders).routes():
        server.routes.route(route.method, route.path)(route.handler)
    try:
        keys = app.settings.keys.load()
    except RuntimeError as exc:   # every request answers 503 until the key file is fixed (no restart needed)
        log.error("InfiniteTalk job API: %s; no request is admitted until it is fixed", exc)
    else:
        (log.info if keys else log.warning)(access_summary(keys, app.settings.open))
    removed = app.service.sweep_if_due()
    log.info("InfiniteTalk job API registered under %s (job database: %s; removed the inputs of %d ended jobs)",
             PREFIX, "PostgreSQL" if app.settings.database_url else "SQLite", len(removed))
    server.loop.call_soon_threadsafe(app.service.upload_sweeper.ensure_running)   # expired uploads go, on a timer
    if app.webhooks is not None:   # every server sweeps for deliveries a stopped server left unfinished
        server.loop.call_soon_threadsafe(lambda: server.loop.create_task(app.webhooks.run()))
    if app.worker is not None:
        server.loop.call_soon_threadsafe(lambda: server.loop.create_task(app.worker.run()))
    else:
        log.info("InfiniteTalk job API: %s=0, this server only records jobs; workers elsewhere run them", ENV_WORKER)
    return True


def _app_for_comfyui(server: Any, folder_paths: Any) -> tuple[JobApp, dict[str, Path]]:
    """The job app from the environment and ComfyUI's folders, and the folders hidden in messages;
    RuntimeError names a bad setting before anything is opened."""
    from .comfy_engine import ComfyEngine

    settings = read_settings()
    try:
        graphs = load_workflows(settings.workflows_dir)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{ENV_WORKFLOWS}: the API workflows cannot be read ({type(exc).__name__}: {exc})") from exc
    user = Path(folder_paths.get_user_directory())
    url = settings.database_url

    def open_db() -> JobStore:
        try:
            return JobStore(url or user / "infinitetalk_api" / "jobs.sqlite3")
        except RuntimeError:
            raise
        except Exception as exc:   # e.g. a SQLite file that cannot be created: a setting (or folder) to fix
            where = ENV_DATABASE_URL if url else "the job database file in ComfyUI's user folder"
            raise RuntimeError(f"{where}: the job database cannot be opened ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from exc
    output = Path(folder_paths.get_output_directory())
    app = build(settings, open_db, ComfyEngine(server), settings.inputs(Path(folder_paths.get_input_directory())),
                graphs, output)
    folders = {"output": output, "user": user, "temp": Path(folder_paths.get_temp_directory()),
               "comfyui": Path(folder_paths.base_path), "package": Path(__file__).resolve().parents[2]}
    return app, folders
