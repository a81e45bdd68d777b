"""aiohttp handlers of the job API and their registration on ComfyUI's server.

Routes (all answer the contract's envelope `{code, message, data}`):
  POST /infinitetalk/v1/image-to-video-multi
  POST /infinitetalk/v1/video-to-video-multi
  GET  /infinitetalk/v1/predictions/{id}/result
  GET  /infinitetalk/v1/predictions/{id}/status
  POST /infinitetalk/v1/predictions/{id}/cancel
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from .auth import authorize, load_keys
from .contract import MODELS, ApiError, envelope, error_envelope
from .inputs import InputSettings
from .jobs import JobService
from .store import JobStore

PREFIX = "/infinitetalk/v1"
ENV_ALLOW_HOSTS = "INFINITETALK_API_ALLOW_HOSTS"
ENV_FETCH_TIMEOUT = "INFINITETALK_API_FETCH_TIMEOUT"
ENV_WORKFLOWS = "INFINITETALK_API_WORKFLOWS"  # a folder with customised copies of the two API workflows
WORKFLOW_FILES = {
    "image-to-video-multi": "infinitetalk_multi_image_api.json",
    "video-to-video-multi": "infinitetalk_multi_video_api.json",
}
log = logging.getLogger("infinitetalk.api")


class JobApi:
    """The five handlers over one JobService; `keys` is re-read per request so keys can rotate."""

    def __init__(self, service: JobService, keys: Callable[[], tuple[str, ...]] = load_keys):
        self.service = service
        self.keys = keys

    def routes(self) -> list[web.RouteDef]:
        out = [web.post(f"{PREFIX}/{kind}", self._submit_handler(kind)) for kind in MODELS]
        out.append(web.post(PREFIX + "/{kind}", self._reply(self._unknown_model)))  # 404 in the contract's shape
        out += [
            web.get(PREFIX + "/predictions/{id}/result", self._reply(self._status)),
            web.get(PREFIX + "/predictions/{id}/status", self._reply(self._status)),
            web.post(PREFIX + "/predictions/{id}/cancel", self._reply(self._cancel)),
        ]
        return out

    @staticmethod
    def _reply(fn):
        async def handler(request: web.Request) -> web.Response:
            try:
                data = await fn(request)
                return web.json_response(envelope(data))
            except ApiError as err:
                return web.json_response(error_envelope(err), status=err.code)
            except Exception as exc:  # noqa: BLE001 - never let a handler take the server down
                log.exception("job API error")
                err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
                return web.json_response(error_envelope(err), status=500)
        return handler

    def _check(self, request: web.Request) -> None:
        authorize(request.headers.get("Authorization"), request.remote, self.keys())

    @staticmethod
    def _base(request: web.Request) -> str:
        return str(request.url.origin())

    def _submit_handler(self, kind: str):
        @self._reply
        async def submit(request: web.Request):
            self._check(request)
            try:
                body = await request.json()
            except web.HTTPRequestEntityTooLarge as exc:
                raise ApiError(413, "request body is larger than this server accepts; send a URL or an "
                                    "uploaded file name instead of a data: URI") from exc
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"request body must be JSON ({exc})") from exc
            rec = await self.service.submit(kind, body)
            return self.service.describe(rec, self._base(request))
        return submit

    async def _unknown_model(self, request: web.Request):
        self._check(request)
        kind = request.match_info["kind"]
        raise ApiError(404, f"unknown model route '{kind}'; available: {', '.join(MODELS)}")

    async def _status(self, request: web.Request):
        self._check(request)
        rec = self.service.refresh(request.match_info["id"])
        return self.service.describe(rec, self._base(request))

    async def _cancel(self, request: web.Request):
        self._check(request)
        rec = self.service.cancel(request.match_info["id"])
        return self.service.describe(rec, self._base(request))


def load_workflows(folder: Path) -> dict[str, dict]:
    out = {}
    for kind, name in WORKFLOW_FILES.items():
        graph = json.loads((folder / name).read_text())
        out[kind] = graph.get("prompt", graph)
    return out


def input_settings(input_dir: Path) -> InputSettings:
    allow = tuple(h.strip() for h in os.environ.get(ENV_ALLOW_HOSTS, "").split(",") if h.strip())
    timeout = float(os.environ.get(ENV_FETCH_TIMEOUT, "60"))
    return InputSettings(input_dir=Path(input_dir), allow_hosts=allow, timeout_s=timeout)


def register_with_comfyui() -> bool:
    """Add the routes to the running ComfyUI server (no-op outside ComfyUI). Returns True if added."""
    try:
        import folder_paths
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    from .comfy_engine import ComfyEngine

    workflows = Path(os.environ.get(ENV_WORKFLOWS) or Path(__file__).resolve().parents[2] / "workflows" / "api")
    store = JobStore(Path(folder_paths.get_user_directory()) / "infinitetalk_api" / "jobs.sqlite3")
    service = JobService(store, ComfyEngine(server), input_settings(Path(folder_paths.get_input_directory())),
                         load_workflows(workflows))
    for route in JobApi(service).routes():
        server.routes.route(route.method, route.path)(route.handler)
    log.info("InfiniteTalk job API registered under %s", PREFIX)
    return True
