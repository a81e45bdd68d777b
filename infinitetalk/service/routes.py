"""aiohttp handlers of the job API and their registration on ComfyUI's server.

Routes (all answer the contract's envelope `{code, message, data}`):
  POST /infinitetalk/v1/image-to-video-multi
  POST /infinitetalk/v1/video-to-video-multi
  GET  /infinitetalk/v1/predictions/{id}/result
  GET  /infinitetalk/v1/predictions/{id}/status
  POST /infinitetalk/v1/predictions/{id}/cancel
  GET  /infinitetalk/v1/health          (no key: for load balancers; status words only)
Anything else under the prefix (another method, an unknown path) answers 405/404 in the same envelope.
Messages never show absolute server paths (`public_message`).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from ..dependencies import missing_message
from .auth import PROXY_HEADERS, access_summary, authorize, load_keys, open_access
from .compat import ROUTES as COMPAT_ROUTES, compat_routes, error_body, reply_shape
from .contract import MODELS, ApiError, envelope, error_envelope, public_message
from .inputs import DEFAULT_RETENTION_S, InputSettings, disk_full_as_507
from .jobs import JobService
from .database import open_store
from .outputs import LocalOutputs
from .s3 import s3_outputs_from_env
from .staging import s3_inputs_from_env
from .webhooks import WebhookSender, make_webhook_check, webhook_body_for, webhook_settings_from_env
from .store import Store, StoreUnavailable
from .uploads import upload_quota_from_env

PREFIX = "/infinitetalk/v1"
ENV_ALLOW_HOSTS = "INFINITETALK_API_ALLOW_HOSTS"
ENV_FETCH_TIMEOUT = "INFINITETALK_API_FETCH_TIMEOUT"
ENV_WORKFLOWS = "INFINITETALK_API_WORKFLOWS"  # a folder with customised copies of the two API workflows
ENV_RETENTION = "INFINITETALK_API_INPUT_RETENTION_HOURS"  # keep a finished job's inputs this long
ENV_DATABASE_URL = "INFINITETALK_API_DATABASE_URL"  # postgresql://… for a fleet; unset = a SQLite file
ENV_WORKER = "INFINITETALK_API_WORKER"  # 0 = an API-only server (runs no jobs)
DB_DOWN = "the job database is unreachable; {what}, retry later"
WORKFLOW_FILES = {
    "image-to-video-multi": "infinitetalk_multi_image_api.json",
    "video-to-video-multi": "infinitetalk_multi_video_api.json",
}
log = logging.getLogger("infinitetalk.api")
# (method, path pattern) of every route, to answer 405 rather than 404 for a known path.
_AT = r"(?:/api)?" + re.escape(PREFIX)  # ComfyUI also serves every route under /api
_ROUTE_SHAPES = [("POST", re.compile(_AT + "/(" + "|".join(map(re.escape, MODELS)) + ")")),
                 ("GET", re.compile(_AT + r"/predictions/[^/]+/(status|result)")), ("GET", re.compile(_AT + "/health")),
                 ("POST", re.compile(_AT + r"/predictions/[^/]+/cancel")),
                 ("GET", re.compile(_AT + r"/uploads/[^/]+/[^/]+")), ("PUT", re.compile(_AT + r"/uploads/[^/]+/[^/]+"))]


class JobApi:
    """The handlers over one JobService; `keys` and `is_open` are re-read per request so keys can rotate.

    `folders` (label -> path) are replaced by `<label>` in messages; the input folder always is.
    """

    def __init__(self, service: JobService, keys: Callable[[], tuple[str, ...]] = load_keys,
                 is_open: Callable[[], bool] = open_access, folders: dict[str, Path] | None = None):
        self.service = service
        self.keys = keys
        self.is_open = is_open
        self.folders = {"input": Path(service.settings.input_dir), **(folders or {})}

    def routes(self) -> list[web.RouteDef]:
        out = [web.post(f"{PREFIX}/{kind}", self._submit_handler(kind)) for kind in MODELS]
        out.append(web.post(PREFIX + "/{kind}", self.reply(self._unknown_model)))  # 404 in the contract's shape
        status = self.reply(self._status, "the job's status cannot be read now (nothing is lost)")
        out += [
            web.get(PREFIX + "/predictions/{id}/result", status),
            web.get(PREFIX + "/predictions/{id}/status", status),
            web.post(PREFIX + "/predictions/{id}/cancel", self.reply(self._cancel, "nothing was cancelled")),
            web.get(PREFIX + "/health", self.reply(self._health)),
            web.route("*", PREFIX + "/{tail:.*}", self.reply(self._no_route)),  # last: other methods / paths
        ]
        out[-1:-1] = compat_routes(self)  # WaveSpeed / RunComfy drop-in paths (compat.py), before the catch-all
        return out

    def reply(self, fn, unavailable: str = "nothing was changed"):
        """Wrap handler `fn(request) -> data` into the contract's envelope: ApiError → its code, a job
        database that cannot be reached → 503 ("…; `unavailable`, retry later"), anything else → 500."""
        async def handler(request: web.Request) -> web.Response:
            try:
                with disk_full_as_507("the job API's files"):  # any write that finds the disk full
                    data = await fn(request)
                return web.json_response(envelope(data))
            except Exception as exc:  # noqa: BLE001 - never let a handler take the server down
                err, headers = self.api_error(exc, unavailable)
                return web.json_response(error_envelope(err), status=err.code, headers=headers)
        return handler

    def api_error(self, exc: Exception, unavailable: str = "nothing was changed") -> tuple[ApiError, dict[str, str]]:
        """What a failed handler answers (every route family shapes it in its own body): ApiError → its code
        with server paths removed, an unreachable job database → 503 with Retry-After, anything else → 500."""
        if isinstance(exc, StoreUnavailable):
            log.error("job API: %s", exc)
            return ApiError(503, DB_DOWN.format(what=unavailable)), {"Retry-After": "5"}
        if isinstance(exc, ApiError):
            return ApiError(exc.code, public_message(exc.message, self.folders)), exc.headers
        log.error("job API error", exc_info=exc)
        return ApiError(500, public_message(f"internal error: {type(exc).__name__}: {exc}", self.folders)), {}

    def check(self, request: web.Request) -> None:
        """Admit the request or raise ApiError 401/503 (missing packages, API keys, loopback-only without keys)."""
        missing = missing_message(public=True)
        if missing:   # a requirements.txt package is not installed: every route says which (not a 500 per job)
            raise ApiError(503, missing)
        try:
            keys = self.keys()
        except RuntimeError as exc:   # a named key file that cannot be read: admit nobody
            log.error("job API refused a request: %s", exc)
            raise ApiError(503, "the server's API key configuration cannot be used right now, so no request is "
                                "admitted; the operator has to fix it (see the server log)") from None
        proxied = any(name in request.headers for name in PROXY_HEADERS)
        authorize(request.headers.get("Authorization"), request.remote, keys, proxied=proxied,
                  is_open=self.is_open())


    @staticmethod
    def _base(request: web.Request) -> str:
        return str(request.url.origin())

    def _submit_handler(self, kind: str):
        async def submit(request: web.Request):
            self.check(request)
            try:
                body = await request.json()
            except web.HTTPRequestEntityTooLarge as exc:
                raise ApiError(413, "request body is larger than this server accepts; send a URL or an "
                                    "uploaded file name instead of a data: URI") from exc
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"request body must be JSON ({exc})") from exc
            except RecursionError as exc:
                raise ApiError(400, "request body must be a flat JSON object; it is nested too deeply") from exc
            rec = await self.service.submit(kind, body, webhook=request.query.get("webhook"),
                                            base_url=self._base(request))
            return self.service.describe(rec, self._base(request))
        return self.reply(submit, "nothing was queued")

    async def _unknown_model(self, request: web.Request):
        self.check(request)
        kind = request.match_info["kind"]
        raise ApiError(404, f"unknown model route '{kind}'; available: {', '.join(MODELS)}")

    async def _no_route(self, request: web.Request):
        self.check(request)
        path = request.path
        allowed = [method for method, pattern in _ROUTE_SHAPES if pattern.fullmatch(path)]
        if allowed and request.method not in allowed:
            raise ApiError(405, f"{request.method} is not allowed on {path}; use {' or '.join(allowed)}")
        raise ApiError(404, f"no API route {request.method} {path}; routes: POST {PREFIX}/<model>, "
                            f"GET {PREFIX}/predictions/<id>/status|result, POST {PREFIX}/predictions/<id>/cancel")

    async def _health(self, request: web.Request):
        """Ready or not, for a load balancer or an orchestrator: no key needed, so it shows status words only
        (no job data, no package or setting names); 503 names what is wrong."""
        problems = []
        if missing_message(public=True):
            problems.append("a package this server needs is not installed (see the server log)")
        try:
            await self.service.db(self.service.store.get, "")   # one round trip to the job database
            database = "ok"
        except StoreUnavailable:
            database = "unreachable"
            problems.append("the job database is unreachable")
        if problems:
            raise ApiError(503, "not ready: " + "; ".join(problems), retry_after_s=5)
        worker = self.service.worker
        return {"status": "ok", "database": database,
                "worker": "off" if worker is None else "busy" if worker.job is not None else "idle"}

    async def _status(self, request: web.Request):
        self.check(request)
        rec = await self.service.status(request.match_info["id"])
        return self.service.describe(rec, self._base(request))

    async def _cancel(self, request: web.Request):
        self.check(request)
        rec = await self.service.cancel(request.match_info["id"])
        return self.service.describe(rec, self._base(request))


def load_workflows(folder: Path) -> dict[str, dict]:
    out = {}
    for kind, name in WORKFLOW_FILES.items():
        graph = json.loads((folder / name).read_text())
        out[kind] = graph.get("prompt", graph)
    return out


def input_settings(input_dir: Path) -> InputSettings:
    """The input-handling settings from the environment (see docs/api.md, "Server settings")."""
    allow = tuple(h.strip() for h in os.environ.get(ENV_ALLOW_HOSTS, "").split(",") if h.strip())
    timeout = _env_number(ENV_FETCH_TIMEOUT, 60.0)
    retention_h = _env_number(ENV_RETENTION, DEFAULT_RETENTION_S / 3600)
    return InputSettings(input_dir=Path(input_dir), allow_hosts=allow, timeout_s=timeout,
                         retention_s=retention_h * 3600)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r}: expected a number (default {default:g})") from None
    if not value >= 0:
        raise RuntimeError(f"{name}={raw!r}: expected a number >= 0 (default {default:g})")
    return value


def service_from_env(open_db: Callable[[], Store], engine: Any, settings: InputSettings,
                     workflows: dict[str, dict], output_dir: Path,
                     environ: Mapping[str, str] | None = None) -> JobService:
    """The job service as the environment configures it: S3 outputs when `INFINITETALK_API_S3_BUCKET` is set
    (else `/view` URLs), job inputs staged there too with `INFINITETALK_API_S3_INPUTS=1`, signed webhooks when `INFINITETALK_API_WEBHOOK_SECRET` is set. RuntimeError names
    a bad setting; the job database (`open_db()`) is opened only once every setting has been read."""
    outputs = s3_outputs_from_env(output_dir, environ) or LocalOutputs(output_dir)
    staging = s3_inputs_from_env(environ)
    hooks = webhook_settings_from_env(environ)
    quota = upload_quota_from_env(environ)
    store = open_db()
    service = JobService(store, engine, settings, workflows, outputs=outputs)
    service.staging = staging
    service.upload_sweeper.quota = quota
    if hooks is not None:   # webhooks only with a signing secret: receivers must be able to verify them
        sender = WebhookSender(store, hooks, settings, webhook_body_for(service, environ))
        service.on_final, service.webhook_check = sender.on_final, make_webhook_check(settings)
        service.webhook_sender = sender
    return service


MISCONFIGURED = ("the job API is not running: the server setting {names} is wrong, so no request is admitted; "
                 "the operator has to fix it and restart the server (the server log says what is wrong)")


def refusing_routes(message: str) -> list[web.RouteDef]:
    """Every job-API path answering 503 with `message`, in its family's body: a server whose API settings
    are wrong still tells each client why (the nodes keep working) instead of answering 404."""
    async def refuse(request: web.Request) -> web.Response:
        err = ApiError(503, message)
        return web.json_response(error_body(err, reply_shape(request.path)), status=503)
    paths = [path for _method, path in COMPAT_ROUTES if not path.startswith(PREFIX)]
    return [web.route("*", path, refuse) for path in dict.fromkeys(paths)] + [web.route("*", PREFIX + "/{tail:.*}", refuse)]


def misconfigured_message(exc: Exception) -> str:
    """The clients' sentence for a bad setting: the setting's name, not its value (that may be a secret)."""
    names = sorted(set(re.findall(r"INFINITETALK_API_[A-Z0-9_]+", str(exc))))
    return MISCONFIGURED.format(names=", ".join(names) or "(see the log)")


def register_with_comfyui() -> bool:
    """Add the routes to the running ComfyUI server (no-op outside ComfyUI). Returns True if added.

    A bad API setting (RuntimeError naming it) is logged once and every API path answers 503 saying which
    setting; the custom nodes load either way."""
    try:
        import folder_paths
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    try:
        service, worker, folders, url = _service_for_comfyui(server, folder_paths)
    except RuntimeError as exc:
        log.error("InfiniteTalk job API not started: %s", exc)
        for route in refusing_routes(misconfigured_message(exc)):
            server.routes.route(route.method, route.path)(route.handler)
        return False
    for route in JobApi(service, folders=folders).routes():
        server.routes.route(route.method, route.path)(route.handler)
    try:
        keys = load_keys()
    except RuntimeError as exc:   # every request answers 503 until the key file is fixed (no restart needed)
        log.error("InfiniteTalk job API: %s; no request is admitted until it is fixed", exc)
    else:
        (log.info if keys else log.warning)(access_summary(keys, open_access()))
    removed = service.sweep_if_due()
    log.info("InfiniteTalk job API registered under %s (job database: %s; removed the inputs of %d ended jobs)",
             PREFIX, "PostgreSQL" if url else "SQLite", len(removed))
    sender = service.webhook_sender
    if sender is not None:   # every server sweeps for deliveries a stopped server left unfinished
        server.loop.call_soon_threadsafe(lambda: server.loop.create_task(sender.run()))
    server.loop.call_soon_threadsafe(service.upload_sweeper.ensure_running)   # expired uploads go, on a timer
    if worker is not None:
        server.loop.call_soon_threadsafe(lambda: server.loop.create_task(worker.run()))
    else:
        log.info("InfiniteTalk job API: %s=0, this server only records jobs; workers elsewhere run them", ENV_WORKER)
    return True


def _service_for_comfyui(server: Any, folder_paths: Any) -> tuple[JobService, Any, dict[str, Path], str]:
    """The job service, its worker (None for an API-only server), the folders hidden in messages and the
    database URL, all from the environment; RuntimeError names a bad setting before anything is opened."""
    from .comfy_engine import ComfyEngine
    from .worker import Worker, lease_from_env

    worker_flag = os.environ.get(ENV_WORKER, "1").strip()
    if worker_flag not in ("0", "1", ""):
        raise RuntimeError(f"{ENV_WORKER}={worker_flag!r}: expected 1 (run jobs here, the default) or 0 (API only)")
    lease_s = lease_from_env()
    settings = input_settings(Path(folder_paths.get_input_directory()))
    workflows = Path(os.environ.get(ENV_WORKFLOWS) or Path(__file__).resolve().parents[2] / "workflows" / "api")
    try:
        graphs = load_workflows(workflows)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{ENV_WORKFLOWS}: the API workflows cannot be read ({type(exc).__name__}: {exc})") from exc
    user = Path(folder_paths.get_user_directory())
    url = os.environ.get(ENV_DATABASE_URL, "").strip()
    def open_db() -> Store:
        try:
            return open_store(url or user / "infinitetalk_api" / "jobs.sqlite3")
        except RuntimeError:
            raise
        except Exception as exc:   # e.g. a SQLite file that cannot be created: a setting (or folder) to fix
            where = ENV_DATABASE_URL if url else "the job database file in ComfyUI's user folder"
            raise RuntimeError(f"{where}: the job database cannot be opened ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from exc
    service = service_from_env(open_db, ComfyEngine(server), settings, graphs, Path(folder_paths.get_output_directory()))
    folders = {"output": Path(folder_paths.get_output_directory()), "user": user,
               "temp": Path(folder_paths.get_temp_directory()), "comfyui": Path(folder_paths.base_path),
               "package": Path(__file__).resolve().parents[2]}
    worker = Worker(service, lease_s=lease_s) if worker_flag != "0" else None
    return service, worker, folders, url
