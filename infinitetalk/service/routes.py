"""aiohttp handlers of the job API (built and registered with ComfyUI by app.py).

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

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..dependencies import missing_message
from .auth import CALLER, PROXY_HEADERS, Caller, authorize
from .compat import ROUTES as COMPAT_ROUTES, compat_routes, error_body, reply_shape
from .contract import MODELS, ApiError, envelope, error_envelope, public_message
from .inputs import disk_full_as_507
from .jobs import JobService
from .settings import DEFAULT_SYNC_WAIT_S
from .store import StoreUnavailable

PREFIX = "/infinitetalk/v1"
DB_DOWN = "the job database is unreachable; {what}, retry later"
log = logging.getLogger("infinitetalk.api")
# (method, path pattern) of every route, to answer 405 rather than 404 for a known path.
_AT = r"(?:/api)?" + re.escape(PREFIX)  # ComfyUI also serves every route under /api
_ROUTE_SHAPES = [("POST", re.compile(_AT + "/(" + "|".join(map(re.escape, MODELS)) + ")")),
                 ("GET", re.compile(_AT + r"/predictions/[^/]+/(status|result)")), ("GET", re.compile(_AT + "/health")),
                 ("POST", re.compile(_AT + r"/predictions/[^/]+/cancel")),
                 ("GET", re.compile(_AT + r"/uploads/[^/]+/[^/]+")), ("PUT", re.compile(_AT + r"/uploads/[^/]+/[^/]+"))]


class JobApi:
    """The handlers over one JobService; `keys` and `is_open` are asked per request so keys can rotate.

    `worker`: this server's Worker (None on an API-only server), for the health answer. `sync_wait_s`: how long
    WaveSpeed's `enable_sync_mode` holds a request open (compat.py).
    `folders` (label -> path) are replaced by `<label>` in messages; the input folder always is.
    """

    def __init__(self, service: JobService, keys: Callable[[], tuple[str, ...]], is_open: Callable[[], bool],
                 worker: Any = None, folders: dict[str, Path] | None = None,
                 sync_wait_s: float = DEFAULT_SYNC_WAIT_S):
        self.service = service
        self.keys = keys
        self.is_open = is_open
        self.worker = worker
        self.sync_wait_s = sync_wait_s
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

    def check(self, request: web.Request) -> Caller:
        """Admit the request or raise ApiError 401/503 (missing packages, API keys, loopback-only without keys);
        the caller (also set in `auth.CALLER` for the job service) is returned."""
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
        caller = authorize(request.headers.get("Authorization"), request.remote, keys, proxied=proxied,
                           is_open=self.is_open())
        caller = dataclasses.replace(caller, idempotency_key=request.headers.get("Idempotency-Key"))
        CALLER.set(caller)
        return caller

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
        worker = self.worker
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


def refusing_routes(message: str) -> list[web.RouteDef]:
    """Every job-API path answering 503 with `message`, in its family's body: a server whose API settings
    are wrong still tells each client why (the nodes keep working) instead of answering 404."""
    async def refuse(request: web.Request) -> web.Response:
        err = ApiError(503, message)
        return web.json_response(error_body(err, reply_shape(request.path)), status=503)
    paths = [path for _method, path in COMPAT_ROUTES if not path.startswith(PREFIX)]
    return ([web.route("*", path, refuse) for path in dict.fromkeys(paths)]
            + [web.route("*", PREFIX + "/{tail:.*}", refuse)])
