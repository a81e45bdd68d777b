"""Job lifecycle: submit (validate, fetch, probe, record in the queue), status, result, cancel.

Submitting only records the job (status `created`) in the job store; a `Worker` (worker.py) beside a
ComfyUI server claims it, runs it on its engine and writes the result. So any server sharing the store
answers for any job. The engine is whatever runs graphs — ComfyUI's own prompt queue in production
(`comfy_engine.py`), a fake in tests — behind a small protocol, so this module runs without ComfyUI.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

from ..errors import InputError
from ..pipeline.request import PRESETS
from .contract import (MAX_SECONDS, TIERS, ApiError, JobRequest, audio_seconds_for, billed_seconds, now_iso,
                       validate_request)
from .graph import build_graph
from .inputs import JOB_INPUTS, InputSettings, disk_full_as_507, remove_job_inputs, resolve_media
from .outputs import LocalOutputs, OutputStore
from .staging import InputStagingError, S3Inputs, UploadTooLarge
from .uploads import CAPS as UPLOAD_CAPS, UPLOADS, UploadSweeper, local_upload, media_type, uploads_root
from .auth import CALLER, Caller
from .store import FINAL, AccountQueueFull, JobRecord, JobStore, StoreUnavailable

log = logging.getLogger("infinitetalk.api")
PARALLEL_PROBES = 2


@dataclass
class EngineState:
    status: str  # queued | running | completed | failed | unknown
    outputs: list[dict[str, str]]
    error: str = ""
    inference_ms: int | None = None


class Engine(Protocol):
    async def queue(self, graph: dict, job_id: str) -> str: ...
    def state(self, prompt_id: str) -> EngineState: ...
    def cancel(self, prompt_id: str) -> bool: ...
    # Optional: `busy() -> bool`, whether the engine runs or queues anything (the worker claims only when idle);
    # `interrupt(prompt_id)`, stop a running prompt (a worker that lost its lease).
    # Optional: `saved_outputs(prefix) -> [{filename, subfolder, type}]`, the videos already written under
    # an output prefix; lets a job that finished unobserved before a restart still report its video.


def _parse_time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


CANCELLED = "cancelled by the client"
OnFinal = Callable[[JobRecord], "Awaitable[None] | None"]
DEDUPE_WINDOW_S = 24 * 3600
MAX_DEDUPE_KEY = 255
QUEUE_FULL_RETRY_S = 30


class QueueFull(ApiError):
    """429: the account's queue is full; clients retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = QUEUE_FULL_RETRY_S):
        super().__init__(429, message, retry_after_s)


def _dedupe_key(header: str | None, field: Any) -> str | None:
    """The submission's idempotency key: the `Idempotency-Key` header, else the `dedupe_key` field."""
    for name, value in (("header 'Idempotency-Key'", header), ("field 'dedupe_key'", field)):
        if value is None or value == "":
            continue
        if not isinstance(value, str) or len(value) > MAX_DEDUPE_KEY or not value.isprintable():
            raise ApiError(400, f"{name}: expected a printable string of at most {MAX_DEDUPE_KEY} characters")
        return value
    return None


def _dedupe_since() -> str:
    """Jobs created since this time (the contract's timestamp form) are returned for a repeated key."""
    since = datetime.now(timezone.utc) - timedelta(seconds=DEDUPE_WINDOW_S)
    return since.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def output_prefix(job_id: str) -> str:
    """Where a job's videos go in the output folder (ComfyUI adds a counter)."""
    return f"infinitetalk_api/{job_id}"


def _probe(field: str, path: Path) -> float | None:
    """Check one input now (the budgets in `infinitetalk.limits`), so over-limit, broken, truncated and
    empty-mask files are refused at submit time. Returns an audio field's decoded seconds."""
    from ..audio.io import decoded_seconds
    from ..pipeline.masks import check_mask
    from ..video.image_check import check_image_complete
    from ..video.reader import probe_video

    if field.endswith("audio"):   # counted by decoding: a header's length may be an estimate (VBR MP3)
        return decoded_seconds(path, field)
    if field == "video":
        probe_video(path, field)
        return None
    check_image_complete(path, field)   # the whole picture, not only its header (a cut-off file is refused)
    if field == "mask_image":
        check_mask(path, field)
    return None


def graph_params(request: dict[str, Any]) -> dict[str, Any]:
    """The workflow parameters of a recorded request: input-folder-relative media names, prompt, order,
    resolution and the resolved seed (the same on every server that runs it)."""
    params: dict[str, Any] = dict(request.get("inputs") or {})
    params.update(prompt=request["prompt"], order=request["order"], resolution=request["resolution"],
                  seed=request["seed"])
    preset = TIERS[request.get("tier", "standard")]
    if preset is not None:   # the tier's sampler settings (the fast tier: turbo), else the workflow's own
        p = PRESETS[preset]
        params.update(preset=preset, steps=p.steps, text_guidance=p.text_guidance, audio_guidance=p.audio_guidance)
    return params


class JobService:
    """Submit/status/cancel over a job store. `outputs` publishes finished videos, `on_final` hears of every
    job that reached its final state (from a worker or a route), `webhook_check` vets a submitted webhook URL,
    `staging` (S3Inputs) stages job inputs for workers elsewhere, `local_cancel(job_id)` lets this server's own
    worker act at once on a cancel flagged for a job it may hold, `max_queued` bounds each account's jobs created
    or running (0: no limit), `upload_sweeper` expires uploads and keeps each account's upload quota."""

    def __init__(self, store: JobStore, engine: Engine | None, settings: InputSettings, workflows: dict[str, dict],
                 outputs: OutputStore | None = None, on_final: OnFinal | None = None,
                 webhook_check: Callable[[str], str] | None = None, cancel_wait_s: float = 10.0,
                 staging: S3Inputs | None = None, local_cancel: Callable[[str], Awaitable[None]] | None = None,
                 max_queued: int = 0, upload_sweeper: UploadSweeper | None = None):
        self.store = store
        self.engine = engine
        self.settings = settings
        self.workflows = workflows
        self.outputs = outputs if outputs is not None else LocalOutputs()
        self.on_final = on_final
        self.webhook_check = webhook_check
        self.cancel_wait_s = cancel_wait_s
        self.staging = staging
        self.local_cancel = local_cancel
        self.max_queued = max_queued   # per account, jobs created or running (0: no limit)
        self.upload_sweeper = upload_sweeper or UploadSweeper(settings)  # expires uploads, keeps each account's quota
        self._submitting: set[str] = set()  # job ids whose inputs are being fetched (never swept)
        self._last_sweep = float("-inf")
        # Probes decode pictures and count audio by decoding (up to a second or two): bound how many run at once.
        self._probing = asyncio.Semaphore(PARALLEL_PROBES)

    async def db(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """A store call off the event loop (a slow or dead database must not stall the server)."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def submit(self, kind: str, body: Any, webhook: str | None = None, base_url: str = "",
                     client_model: str | None = None) -> JobRecord:
        """Validate, fetch and probe every input, then record the job in the queue for the caller's account; a
        refusal (or a database that cannot record it) leaves no file of this job behind. `base_url`: the origin
        the client used, kept with the job for the links of its webhook; `client_model`: the model id a drop-in
        route was called with (its answers and webhook echo it; compat.route_family). A submission repeating an
        `Idempotency-Key` header (or `dedupe_key` field) of the account's within DEDUPE_WINDOW_S gets that job
        back, so a client retrying after a lost reply never pays twice."""
        req = validate_request(kind, body)
        caller = CALLER.get()
        dedupe_key = _dedupe_key(caller.idempotency_key, body.get("dedupe_key"))
        if dedupe_key is not None:
            first = await self.db(self.store.find_dedupe, caller.account, dedupe_key, _dedupe_since())
            if first is not None:
                return first
        if webhook is not None:
            if self.webhook_check is None:
                raise ApiError(400, "query parameter 'webhook': this server sends no webhooks "
                                    "(INFINITETALK_API_WEBHOOK_SECRET is not set)")
            webhook = self.webhook_check(webhook)
        self.sweep_if_due()
        job_id = uuid.uuid4().hex
        self._submitting.add(job_id)
        queued = False
        try:
            record = await self._fetch_probe_record(job_id, req, webhook, base_url, caller.account, dedupe_key,
                                                    client_model)
            queued = record.id == job_id   # else a twin submission with the same key came first: that job
            return record
        finally:
            self._submitting.discard(job_id)
            if not queued:
                remove_job_inputs(self.settings, job_id)

    async def _fetch_probe_record(self, job_id: str, req: JobRequest, webhook: str | None, base_url: str,
                                  account: str, dedupe_key: str | None, client_model: str | None) -> JobRecord:
        local: dict[str, Path] = {}
        for field_name, value in req.media.items():
            local[field_name] = await resolve_media(job_id, field_name, value, self.settings, self.local_upload)
        loop = asyncio.get_running_loop()
        seconds: dict[str, float | None] = {}
        for field_name, path in local.items():
            try:
                async with self._probing:
                    seconds[field_name] = await loop.run_in_executor(None, _probe, field_name, path)
            except InputError as exc:
                detail = str(exc).removeprefix(f"{exc.input_name}: ")  # the field is named once
                raise ApiError(400, f"field '{field_name}': {detail}") from exc
            clip = seconds[field_name]
            if clip is not None and clip > MAX_SECONDS:
                raise ApiError(400, f"field '{field_name}': the audio lasts {clip:.1f} s; clips are limited to "
                                    f"{MAX_SECONDS:.0f} s (10 minutes)")
        total = audio_seconds_for(req.order, seconds["left_audio"] or 0.0, seconds["right_audio"] or 0.0)
        if total > MAX_SECONDS:
            raise ApiError(400, f"the audio lasts {total:.1f} s with order '{req.order}'; clips are limited to "
                                f"{MAX_SECONDS:.0f} s (10 minutes)")
        if total <= 0:
            raise ApiError(400, "the audio inputs are empty")
        seed = req.seed if req.seed >= 0 else random.SystemRandom().randint(0, 2**31 - 1)
        root = Path(self.settings.input_dir).resolve()
        inputs = {f: path.resolve().relative_to(root).as_posix() for f, path in local.items()}
        request = {**req.to_json(), "seed": seed, "inputs": inputs, "base_url": base_url.rstrip("/")}
        if client_model:
            request["client_model"] = client_model
        build_graph(self.workflows[req.kind], graph_params(request), filename_prefix=output_prefix(job_id))  # fits
        if self.staging is not None:   # for a worker without this server's input folder
            try:
                request["staged"] = await loop.run_in_executor(None, self.staging.stage, job_id, local)
            except InputStagingError as exc:
                log.error("job API: staging the inputs of a submission failed: %s", exc)
                raise ApiError(503, f"{exc}; nothing was queued, retry later") from exc
        record = JobRecord(id=job_id, model=req.model, request=request, status="created", created_at=now_iso(),
                           video_seconds=total, billed_seconds=billed_seconds(total), webhook=webhook, account=account,
                           dedupe_key=dedupe_key)
        try:
            with disk_full_as_507("the job database (in the user folder)"):
                stored = await self.db(self.store.insert, record, max_active=self.max_queued,
                                       dedupe_since=_dedupe_since())
        except AccountQueueFull as exc:
            await self._unstage(record)
            raise QueueFull(f"this account has {exc.active} jobs queued or running, the most this server takes "
                            f"per account; nothing was queued, retry once one of them has ended") from None
        except BaseException:
            await self._unstage(record)
            raise
        if stored.id != record.id:
            await self._unstage(record)
        return stored

    def local_upload(self, settings: InputSettings, value: str, field_name: str) -> Path | None:
        """uploads.local_upload, bringing an upload another server took from the bucket when inputs are staged."""
        remote = None if self.staging is None else functools.partial(self._upload_from_bucket, settings, field_name)
        return local_upload(settings, value, field_name, remote=remote)

    def _upload_from_bucket(self, settings: InputSettings, field_name: str, upload_id: str, name: str) -> Path | None:
        try:
            return self.staging.fetch_upload(upload_id, name, uploads_root(settings) / upload_id,
                                             UPLOAD_CAPS[media_type(name)])
        except InputStagingError as exc:
            raise ApiError(413 if isinstance(exc, UploadTooLarge) else 503, f"field '{field_name}': {exc}") from exc

    async def _unstage(self, rec: JobRecord) -> None:
        """Delete a job's staged inputs (best effort: a bucket lifecycle rule is the backstop)."""
        staged = rec.request.get("staged")
        if self.staging is None or not staged:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.staging.remove, staged)
        except Exception as exc:  # noqa: BLE001 - the job's outcome stands whatever the bucket says
            log.warning("job API: the staged inputs of job %s were not deleted: %s", rec.id, exc)

    def graph_for(self, rec: JobRecord, inputs: dict[str, str] | None = None) -> dict:
        """The ComfyUI graph of a recorded job (built by the worker that runs it); `inputs` replaces the
        recorded input names (the worker's copies of staged inputs)."""
        params = graph_params(rec.request)
        params.update(inputs or {})
        return build_graph(self.workflows[rec.request["kind"]], params, filename_prefix=output_prefix(rec.id))

    async def local_inputs(self, rec: JobRecord) -> dict[str, str] | None:
        """This server's input names for the job: None when they are the recorded ones (nothing staged),
        else its own copies of the staged inputs (downloaded if it lacks them). InputStagingError."""
        staged = rec.request.get("staged")
        if self.staging is None or not staged:
            return None
        return await asyncio.get_running_loop().run_in_executor(
            None, self.staging.materialize, rec.id, rec.request["inputs"], staged, Path(self.settings.input_dir))

    def sweep_if_due(self) -> list[str]:
        """Run `clean_inputs` at most once per `settings.sweep_interval_s` (called on submit)."""
        now = time.monotonic()
        if now - self._last_sweep < self.settings.sweep_interval_s:
            return []
        self._last_sweep = now
        try:
            return self.clean_inputs()
        except Exception:  # noqa: BLE001 - cleaning is best effort; a submission must not fail because of it
            log.exception("cleaning old job inputs failed")
            return []

    def clean_inputs(self, now: datetime | None = None) -> list[str]:
        """Delete `<input>/infinitetalk_api/<id>/` of jobs that ended more than `retention_s` ago, and of
        folders no job record owns (a crash mid-submit) older than that. Returns the removed job ids."""
        root = Path(self.settings.input_dir) / JOB_INPUTS
        if not root.is_dir():
            return []
        now = now or datetime.now(timezone.utc)
        keep_s = self.settings.retention_s
        removed = []
        for folder in sorted(root.iterdir()):
            if not folder.is_dir() or folder.name in self._submitting or folder.name == UPLOADS:  # uploads: own sweep
                continue
            rec = self.store.get(folder.name)
            if rec is not None and rec.status not in FINAL:
                continue   # queued or running (on any server): its inputs are in use, whatever their age
            ended = (_parse_time(rec.completed_at or rec.created_at) if rec is not None else None) \
                or datetime.fromtimestamp(folder.stat().st_mtime, timezone.utc)
            if (now - ended).total_seconds() >= keep_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def get(self, job_id: str, caller: Caller = Caller()) -> JobRecord:
        """The job, if `caller` may see it (its account's, or any for an admin); else 404, as for an unknown id."""
        rec = self.store.get(job_id)
        if rec is None or not (caller.admin or rec.account == caller.account):
            raise ApiError(404, f"no prediction with id '{job_id}'")
        return rec

    async def status(self, job_id: str) -> JobRecord:
        """The job as the request's caller may see it."""
        return await self.db(self.get, job_id, CALLER.get())

    async def notify_final(self, rec: JobRecord) -> None:
        """Tell `on_final` that `rec` reached its final state (and delete its staged inputs); its failures are
        logged, never raised."""
        await self._unstage(rec)
        if self.on_final is None:
            return
        try:
            result = self.on_final(rec)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - a notification must not undo a recorded result
            log.exception("on_final for job %s failed", rec.id)

    async def cancel(self, job_id: str) -> JobRecord:
        """Unclaimed: cancelled now. Claimed but not started: flagged; its worker drops it from its queue at
        its next heartbeat (answered once it did, or after `cancel_wait_s` with the flag set). Running: 409."""
        rec = await self.status(job_id)
        if rec.status in FINAL:
            raise ApiError(409, f"prediction '{job_id}' has already ended ({rec.status}); nothing to cancel")
        if rec.status == "created" and await self.db(self.store.cancel_unclaimed, job_id, CANCELLED):
            try:
                rec = await self.status(job_id)
            except StoreUnavailable:   # cancelled, but not readable now: answer (and notify) from what was written
                rec = dataclasses.replace(rec, status="failed", error=CANCELLED, completed_at=now_iso())
            await self.notify_final(rec)
            return rec
        if rec.status == "processing" or not await self.db(self.store.request_cancel, job_id):
            rec = await self.status(job_id)
            if rec.status in FINAL and rec.error == CANCELLED:
                return rec
            raise ApiError(409, f"prediction '{job_id}' is already running and cannot be cancelled")
        if self.local_cancel is not None:
            await self.local_cancel(job_id)
        deadline = time.monotonic() + self.cancel_wait_s
        while True:
            rec = await self.status(job_id)
            if rec.status == "processing":
                raise ApiError(409, f"prediction '{job_id}' started before the cancel reached it and cannot be "
                                    "cancelled now")
            if rec.status in FINAL or time.monotonic() >= deadline:
                return rec
            await asyncio.sleep(0.2)

    def describe(self, rec: JobRecord, base_url: str) -> dict[str, Any]:
        """The contract's `data` object for a record; URLs are absolute on `base_url`."""
        base = base_url.rstrip("/")
        outputs = self.outputs.urls(rec.outputs, base)
        return {
            "id": rec.id,
            "model": rec.model,
            "outputs": outputs,
            "urls": {"get": f"{base}/infinitetalk/v1/predictions/{rec.id}/result"},
            "has_nsfw_contents": [False] * len(outputs),   # WaveSpeed's field: nothing is flagged here
            "status": rec.status,
            "created_at": rec.created_at,
            "error": rec.error,
            "timings": {"inference": rec.inference_ms},
            "billed_seconds": 0 if rec.status == "failed" else rec.billed_seconds,  # failed jobs are not billed
            "seed": rec.request.get("seed"),
        }
