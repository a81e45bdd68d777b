"""Drop-in routes beside /infinitetalk/v1: WaveSpeed's v3 paths and RunComfy's model-API paths.

WaveSpeed (the contract's envelope `{code, message, data}`, `data` as GET result answers it):
  POST /api/v3/wavespeed-ai/infinitetalk/image-to-video-multi | video-to-video-multi  [?webhook=URL]
  POST /api/v3/wavespeed-ai/infinitetalk-fast/image-to-video-multi | video-to-video-multi   (fast tier: turbo)
       body may hold `enable_sync_mode: true`: answer once the job ended (bounded wait: INFINITETALK_API_SYNC_WAIT_SECONDS)
  GET  /api/v3/predictions/{id}/result
  POST /api/v3/media/upload/binary     multipart `file` -> {type, download_url, filename, size}
  POST /api/v3/media/uploads           {filename, size, content_type} -> PUT ticket + download_url
  PUT  /infinitetalk/v1/uploads/{id}/{name}?token=..   the ticket's upload (token instead of Bearer)
  GET  /infinitetalk/v1/uploads/{id}/{name}            the uploaded file
RunComfy (its own shapes; status words in_queue, in_progress, completed, cancelled):
  POST /v1/models/community/infinite-talk/fast/multi  [?webhook=URL]   (fast tier: turbo)
  GET  /v1/requests/{id}/status | /v1/requests/{id}/result      POST /v1/requests/{id}/cancel
Every route but the ticketed PUT needs the same Bearer key as the contract's routes.
"""
from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
import uuid
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from . import uploads
from .contract import ApiError, envelope, error_envelope
from .inputs import disk_full_as_507
from .store import FINAL
from .staging import InputStagingError

WAVESPEED_MODELS = {"wavespeed-ai/infinitetalk/image-to-video-multi": "image-to-video-multi",
                    "wavespeed-ai/infinitetalk/video-to-video-multi": "video-to-video-multi",
                    "wavespeed-ai/infinitetalk-fast/image-to-video-multi": "image-to-video-multi",
                    "wavespeed-ai/infinitetalk-fast/video-to-video-multi": "video-to-video-multi"}
RUNCOMFY_MODEL = "community/infinite-talk/fast/multi"
V3_OTHER = "/api/v3/{tail:.*}"
# The hosted fast tier: these routes' jobs run the contract's tier "fast" (the turbo preset).
FAST_TIER_PATHS = ("/api/v3/wavespeed-ai/infinitetalk-fast/", f"/v1/models/{RUNCOMFY_MODEL}")
SYNC_POLL_S = 0.5
log = logging.getLogger("infinitetalk.api")


def runcomfy_status(rec: Any) -> str:
    """RunComfy's status word: a failed job is `completed` (its result carries the error) unless cancelled."""
    if rec.status == "created":
        return "in_queue"
    if rec.status == "processing":
        return "in_progress"
    if rec.status == "failed" and rec.error == "cancelled by the client":
        return "cancelled"
    return "completed"


class Compat:
    """The drop-in handlers over one JobApi (its service, key check and message cleaning)."""

    def __init__(self, api: Any):
        self.api = api
        self.service = api.service

    # -- plumbing -------------------------------------------------------------------------------------------
    def _check(self, request: web.Request) -> Any:
        """Admit the request (JobApi.check); returns its auth.Caller."""
        return self.api.check(request)

    def _wrap(self, fn, shape: str, unavailable: str = "nothing was changed"):
        """Handler answering `fn`'s data in the WaveSpeed envelope or as RunComfy's bare JSON; errors as
        the contract's routes answer them (`JobApi.api_error`)."""
        async def handler(request: web.Request) -> web.Response:
            try:
                with disk_full_as_507("the job API's files"):
                    data = await fn(request)
                return web.json_response(envelope(data) if shape == "wavespeed" else data)
            except Exception as exc:  # noqa: BLE001 - never let a handler take the server down
                err, headers = self.api.api_error(exc, unavailable)
            return web.json_response(error_body(err, shape), status=err.code, headers=headers)
        return handler

    @staticmethod
    def _base(request: web.Request) -> str:
        return str(request.url.origin())

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return await request.json()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(413, "request body is larger than this server accepts; send URLs or upload the "
                                "files first (POST /api/v3/media/upload/binary)") from exc
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiError(400, f"request body must be a JSON object ({type(exc).__name__})") from exc

    async def _submit(self, request: web.Request, kind: str, body: Any, client_model: str):
        if isinstance(body, dict):   # the route decides the tier
            body = {**body, "tier": "fast" if request.path.startswith(FAST_TIER_PATHS) else "standard"}
        return await self.service.submit(kind, body, webhook=request.query.get("webhook"),
                                         base_url=self._base(request), client_model=client_model)

    def _wavespeed_data(self, rec: Any, base: str) -> dict:
        return wavespeed_data(self.service, rec, base)

    # -- WaveSpeed ------------------------------------------------------------------------------------------
    def _ws_submit(self, model: str, kind: str):
        async def submit(request: web.Request):
            self._check(request)
            body = await self._json(request)
            sync = False
            if isinstance(body, dict):
                body = dict(body)
                sync = body.pop("enable_sync_mode", False)
                if not isinstance(sync, bool):
                    raise ApiError(400, f"field 'enable_sync_mode' must be true or false; got {sync!r}")
                body.pop("enable_base64_output", None)  # accepted and ignored: outputs are always URLs
            wait = self.api.sync_wait_s if sync else 0.0
            rec = await self._submit(request, kind, body, model)
            base = self._base(request)
            if not sync:
                return self._wavespeed_data(rec, base)
            deadline = time.monotonic() + wait
            while rec.status not in FINAL and time.monotonic() < deadline:
                await asyncio.sleep(SYNC_POLL_S)
                rec = await self.service.status(rec.id)
            data = self._wavespeed_data(rec, base)
            if rec.status not in FINAL:  # the SDK recognises this wording and reports the task id
                data["error"] = (f"Sync mode timed out after {wait:.0f} s; the job goes on: query the result "
                                 f"at {data['urls']['get']}")
            return data
        return submit

    async def _ws_result(self, request: web.Request):
        self._check(request)
        rec = await self.service.status(request.match_info["id"])
        return self._wavespeed_data(rec, self._base(request))

    async def _ws_other(self, request: web.Request):
        """A v3 path this server does not serve: 405 for a served path and another method, else 404 (a WaveSpeed
        model id other than the two served here, or no route at all), in v3's envelope."""
        self._check(request)
        path = request.path
        allowed = sorted({method for method, pattern in ROUTES if method != "*" and _matches(pattern, path)})
        if allowed:
            raise ApiError(405, f"{request.method} is not allowed on {path}; use {' or '.join(allowed)}")
        served = ", ".join(WAVESPEED_MODELS)
        raise ApiError(404, f"no model or route {path.removeprefix('/api/v3/')!r} on this server; its WaveSpeed "
                            f"models are {served}")

    async def _ws_upload_binary(self, request: web.Request):
        owner = self._check(request).account   # uploads count against the caller's account
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, f"the upload must be multipart/form-data with a 'file' part; got "
                                f"Content-Type {request.content_type!r}")
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                raise ApiError(400, "missing multipart field 'file'")
            if getattr(part, "name", None) == "file":
                break
        name = uploads.safe_name(unquote(part.filename or ""))  # some clients percent-encode the name

        async def chunks():
            while True:
                chunk = await part.read_chunk(1 << 16)
                if not chunk:
                    return
                yield chunk
        self.service.upload_sweeper.check(owner, 0)
        upload_id, path, size = await uploads.save(self.service.settings, name, chunks(), owner=owner)
        await self._to_bucket(upload_id, name, path)
        self.service.upload_sweeper.added(owner, size)
        return {"type": uploads.media_type(name), "download_url": uploads.download_url(self._base(request), upload_id, name),
                "filename": name, "size": size}

    async def _to_bucket(self, upload_id: str, name: str, path) -> None:
        """With staged inputs, the upload goes to the bucket too (any server may take the submission naming it);
        503 and nothing kept when it cannot."""
        staging = self.service.staging
        if staging is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, staging.put_upload, upload_id, name, path)
        except InputStagingError as exc:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise ApiError(503, f"{exc}; nothing was kept, retry later") from exc

    async def _ws_upload_ticket(self, request: web.Request):
        owner = self._check(request).account   # uploads count against the caller's account
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object {filename, size[, content_type]}")
        if not isinstance(body.get("filename"), str) or not body["filename"].strip():
            raise ApiError(400, f"field 'filename' must be the file's name; got {body.get('filename')!r}")
        ctype = body.get("content_type") if isinstance(body.get("content_type"), str) else "application/octet-stream"
        base = self._base(request)
        name, size = uploads.ticket_terms(body["filename"], body.get("size"))
        self.service.upload_sweeper.check(owner, size)
        if self.service.staging is not None:   # the PUT goes straight to the bucket, presigned (as S3 tickets do)
            upload_id = uuid.uuid4().hex
            put_url = self.service.staging.upload_url(upload_id, name, ctype, int(uploads.TICKET_TTL_S))
            uploads.hold_staged_ticket(self.service.settings, upload_id, name, size, owner=owner)
        else:
            upload_id, name, token = uploads.create_ticket(self.service.settings, body["filename"], size, owner=owner)
            put_url = f"{uploads.download_url(base, upload_id, name)}?token={token}"
        self.service.upload_sweeper.added(owner, size)
        return {"upload": {"method": "PUT", "url": put_url, "headers": {"Content-Type": ctype},
                           "expires_in": int(uploads.TICKET_TTL_S)},
                "download_url": uploads.download_url(base, upload_id, name), "filename": name, "size": body["size"],
                "type": uploads.media_type(name)}

    async def _upload_put(self, request: web.Request):
        upload_id, name = request.match_info["id"], request.match_info["name"]
        size = uploads.take_ticket(self.service.settings, upload_id, name, request.query.get("token", ""))
        _id, _path, got = await uploads.save(self.service.settings, name, request.content.iter_chunked(1 << 16),
                                             upload_id=upload_id, expected_size=size)
        return {"download_url": uploads.download_url(self._base(request), upload_id, name), "size": got}

    async def _upload_get(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check(request)
            value = str(request.url)   # the download_url itself: this server's copy, else the bucket's
            path = await asyncio.get_running_loop().run_in_executor(None, self.service.local_upload,
                                                                    self.service.settings, value, "file")
            if path is None:   # not an upload id
                raise ApiError(404, f"no upload with id {request.match_info['id']!r}")
        except ApiError as err:
            err = ApiError(404 if err.code == 400 else err.code, err.message)
            return web.json_response(error_envelope(err), status=err.code)
        return web.FileResponse(path)

    # -- RunComfy -------------------------------------------------------------------------------------------
    def _rc_urls(self, base: str, job_id: str) -> dict:
        root = f"{base}/v1/requests/{job_id}"
        return {"status_url": f"{root}/status", "result_url": f"{root}/result", "cancel_url": f"{root}/cancel"}

    async def _rc_submit(self, request: web.Request):
        self._check(request)
        body = await self._json(request)
        kind = "video-to-video-multi" if isinstance(body, dict) and body.get("video") not in (None, "") \
            else "image-to-video-multi"
        rec = await self._submit(request, kind, body, RUNCOMFY_MODEL)
        return {"request_id": rec.id, **self._rc_urls(self._base(request), rec.id)}

    async def _rc_status(self, request: web.Request):
        self._check(request)
        rec = await self.service.status(request.match_info["id"])
        out = {"request_id": rec.id, "status": runcomfy_status(rec)}
        if out["status"] == "in_queue":   # jobs ahead of this one (0: it runs next)
            out["queue_position"] = await self.service.db(self.service.store.queue_ahead, rec.id)
        urls = self._rc_urls(self._base(request), rec.id)
        out.update(status_url=urls["status_url"], result_url=urls["result_url"])
        return out

    async def _rc_result(self, request: web.Request):
        self._check(request)
        rec = await self.service.status(request.match_info["id"])
        data = self.service.describe(rec, self._base(request))
        videos = data["outputs"]
        return {"request_id": rec.id, "status": runcomfy_status(rec),
                "outputs": {"video": videos[0]} if videos else None,
                "error": rec.error or None, "created_at": rec.created_at, "finished_at": rec.completed_at,
                "billed_seconds": data["billed_seconds"], "seed": data["seed"]}

    async def _rc_cancel(self, request: web.Request):
        self._check(request)
        rec = await self.service.cancel(request.match_info["id"])
        return {"request_id": rec.id, "status": runcomfy_status(rec)}

    def routes(self) -> list[web.RouteDef]:
        queued, read, cancelled = "nothing was queued", "the job's status cannot be read now (nothing is lost)", \
            "nothing was cancelled"
        handlers = {
            **{("POST", f"/api/v3/{model}"): (self._ws_submit(model, kind), queued)
               for model, kind in WAVESPEED_MODELS.items()},
            ("GET", "/api/v3/predictions/{id}/result"): (self._ws_result, read),
            ("POST", "/api/v3/media/upload/binary"): (self._ws_upload_binary, "nothing was stored"),
            ("POST", "/api/v3/media/uploads"): (self._ws_upload_ticket, "nothing was stored"),
            ("PUT", uploads.URL_PATH + "/{id}/{name}"): (self._upload_put, "nothing was stored"),
            ("POST", f"/v1/models/{RUNCOMFY_MODEL}"): (self._rc_submit, queued),
            ("GET", "/v1/requests/{id}/status"): (self._rc_status, read),
            ("GET", "/v1/requests/{id}/result"): (self._rc_result, read),
            ("POST", "/v1/requests/{id}/cancel"): (self._rc_cancel, cancelled),
            ("*", V3_OTHER): (self._ws_other, "nothing was changed"),
        }
        out = []
        for method, path in ROUTES:
            if (method, path) == ("GET", uploads.URL_PATH + "/{id}/{name}"):
                out.append(web.get(path, self._upload_get))   # a file, not an envelope
                continue
            fn, unavailable = handlers[method, path]
            out.append(web.route(method, path, self._wrap(fn, reply_shape(path), unavailable)))
        return out


# Every drop-in route, (method, path): also what a misconfigured server refuses (routes.refusing_routes).
ROUTES = (*(("POST", f"/api/v3/{model}") for model in WAVESPEED_MODELS),
          ("GET", "/api/v3/predictions/{id}/result"), ("POST", "/api/v3/media/upload/binary"),
          ("POST", "/api/v3/media/uploads"), ("PUT", uploads.URL_PATH + "/{id}/{name}"),
          ("GET", uploads.URL_PATH + "/{id}/{name}"), ("POST", f"/v1/models/{RUNCOMFY_MODEL}"),
          ("GET", "/v1/requests/{id}/status"), ("GET", "/v1/requests/{id}/result"), ("POST", "/v1/requests/{id}/cancel"),
          ("*", V3_OTHER))   # last: any other v3 path (a model this server does not serve) answers in v3's shape


def _matches(pattern: str, path: str) -> bool:
    """Whether `path` fits a route pattern whose `{name}` parts are single path segments."""
    parts = re.split(r"\{[^}]+\}", pattern)
    return re.fullmatch("[^/]+".join(map(re.escape, parts)), path) is not None


def route_family(rec: Any) -> str:
    """Which API the job was submitted on: `wavespeed` (v3), `runcomfy`, or `contract` (/infinitetalk/v1)."""
    model = rec.request.get("client_model")
    return "wavespeed" if model in WAVESPEED_MODELS else "runcomfy" if model == RUNCOMFY_MODEL else "contract"


def result_url(rec: Any, base: str) -> str:
    """The result route of the family the job was submitted on (a webhook's `urls.get`)."""
    family = route_family(rec)
    if family == "wavespeed":
        return f"{base}/api/v3/predictions/{rec.id}/result"
    if family == "runcomfy":
        return f"{base}/v1/requests/{rec.id}/result"
    return f"{base}/infinitetalk/v1/predictions/{rec.id}/result"


def wavespeed_data(service: Any, rec: Any, base: str) -> dict:
    """`data` of a v3 answer: the contract's, with the model id the client submitted with and `urls.get` on
    the v3 result route."""
    data = service.describe(rec, base)
    data["model"] = rec.request.get("client_model") or rec.model
    data["urls"] = {"get": f"{base}/api/v3/predictions/{rec.id}/result"}
    return data


def client_input(rec: Any) -> dict:
    """The job's input as the client sent it (seed resolved); a `data:` URI only by its type and size."""
    req = rec.request
    media = {name: (value.split(",", 1)[0] + f",<{len(value)} characters>" if value.startswith("data:") else value)
             for name, value in req.get("media", {}).items()}
    return {**media, "prompt": req.get("prompt", ""), "order": req.get("order"), "resolution": req.get("resolution"),
            "seed": req.get("seed")}


def prediction_object(service: Any, rec: Any, base: str) -> dict:
    """WaveSpeed's flat prediction object (a webhook body): id, model, input, outputs, urls (`get` on the route
    family the job was submitted on), has_nsfw_contents, status, created_at, error, timings, then ours."""
    data = service.describe(rec, base)
    first = {"id": rec.id, "model": rec.request.get("client_model") or rec.model, "input": client_input(rec),
             "outputs": data["outputs"], "urls": {"get": result_url(rec, base)}}
    return {**first, **{k: v for k, v in data.items() if k not in first}}


def reply_shape(path: str) -> str:
    """RunComfy's paths answer its bare JSON; every other path the contract's (WaveSpeed's) envelope."""
    return "runcomfy" if path.startswith("/v1/") else "wavespeed"


def error_body(err: ApiError, shape: str) -> dict:
    """An error as a route family (`reply_shape`) answers it."""
    return error_envelope(err) if shape == "wavespeed" else {"error": err.message, "code": err.code}


def compat_routes(api: Any) -> list[web.RouteDef]:
    """The WaveSpeed and RunComfy drop-in routes over a JobApi (append before its catch-all route)."""
    return Compat(api).routes()
