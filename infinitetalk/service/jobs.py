"""Job lifecycle: submit (validate, fetch, probe, queue), status, result, cancel.

The engine is whatever runs graphs — ComfyUI's own prompt queue in production (`comfy_engine.py`),
a fake in tests — behind a four-method protocol, so this module runs without ComfyUI.
"""
from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from ..errors import InputError
from .contract import MAX_SECONDS, ApiError, JobRequest, audio_seconds_for, billed_seconds, now_iso, validate_request
from .graph import build_graph
from .inputs import JOB_INPUTS, InputSettings, disk_full_as_507, remove_job_inputs, resolve_media
from .store import JobRecord, JobStore

FINAL = ("completed", "failed")
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
    # Optional: `saved_outputs(prefix) -> [{filename, subfolder, type}]`, the videos already written under
    # an output prefix; lets a job that finished unobserved before a restart still report its video.


def _parse_time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def output_prefix(job_id: str) -> str:
    """Where a job's videos go in the output folder (ComfyUI adds a counter)."""
    return f"infinitetalk_api/{job_id}"


def _probe(field: str, path: Path) -> float | None:
    """Check one input from its headers now (the budgets in `infinitetalk.limits`), so over-limit,
    broken and empty-mask files are refused at submit time. Returns an audio field's seconds."""
    from .. import limits
    from ..audio.io import probe_audio
    from ..pipeline.masks import check_mask
    from ..video.reader import probe_image, probe_video

    if field.endswith("audio"):
        info = probe_audio(path, field)
        if info.seconds == info.seconds:  # not NaN: the header knows the duration
            return info.seconds
        from ..audio.io import load_audio  # no duration in the header: decode (bounded by load_audio's limits)

        clip = load_audio(path, name=field)
        seconds = clip.samples.shape[-1] / clip.sample_rate
        limits.check_audio_format(clip.sample_rate, info.channels, seconds, field)
        return seconds
    if field == "video":
        probe_video(path, field)
        return None
    if field == "mask_image":
        check_mask(path, field)
        return None
    probe_image(path, field)
    return None


class JobService:
    def __init__(self, store: JobStore, engine: Engine, settings: InputSettings, workflows: dict[str, dict]):
        self.store = store
        self.engine = engine
        self.settings = settings
        self.workflows = workflows
        self._submitting: set[str] = set()  # job ids whose inputs are being fetched (never swept)
        self._last_sweep = float("-inf")
        # Probes are header reads (ms) but a mask is decoded: bound how many inputs are open at once.
        self._probing = asyncio.Semaphore(PARALLEL_PROBES)

    async def submit(self, kind: str, body: Any) -> JobRecord:
        """Validate, fetch and probe every input, then queue; a refusal leaves no file of this job behind."""
        req = validate_request(kind, body)
        self.sweep_if_due()
        job_id = uuid.uuid4().hex
        self._submitting.add(job_id)
        queued = False
        try:
            record = await self._fetch_probe_queue(job_id, req)
            queued = True
            return record
        finally:
            self._submitting.discard(job_id)
            if not queued:
                remove_job_inputs(self.settings, job_id)

    async def _fetch_probe_queue(self, job_id: str, req: JobRequest) -> JobRecord:
        local: dict[str, Path] = {}
        for field_name, value in req.media.items():
            local[field_name] = await resolve_media(job_id, field_name, value, self.settings)
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
        params: dict[str, Any] = {f: path.resolve().relative_to(root).as_posix() for f, path in local.items()}
        params.update(prompt=req.prompt, order=req.order, resolution=req.resolution, seed=seed)
        graph = build_graph(self.workflows[req.kind], params, filename_prefix=output_prefix(job_id))
        record = JobRecord(id=job_id, model=req.model, request={**req.to_json(), "seed": seed}, status="created",
                           created_at=now_iso(), video_seconds=total, billed_seconds=billed_seconds(total))
        with disk_full_as_507("the job database (in the user folder)"):
            self.store.insert(record)
        try:
            prompt_id = await self.engine.queue(graph, job_id)
        except Exception as exc:  # the record must not stay "created" for a job that never queued
            error = exc.message if isinstance(exc, ApiError) else f"the job could not be queued ({type(exc).__name__})"
            self.store.update(job_id, status="failed", completed_at=now_iso(), error=error)
            raise
        self.store.update(job_id, prompt_id=prompt_id)
        record.prompt_id = prompt_id
        return record

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
        folders no queued job owns (no record, or a record never queued: a crash mid-submit) older than
        that. Returns the removed job ids."""
        root = Path(self.settings.input_dir) / JOB_INPUTS
        if not root.is_dir():
            return []
        now = now or datetime.now(timezone.utc)
        keep_s = self.settings.retention_s
        removed = []
        for folder in sorted(root.iterdir()):
            if not folder.is_dir() or folder.name in self._submitting:
                continue
            rec = self.store.get(folder.name)
            if rec is not None:
                rec = self.refresh(rec.id)
                if rec.status not in FINAL and rec.prompt_id:
                    continue   # queued or running: its inputs are in use, whatever their age
            ended = (_parse_time(rec.completed_at or rec.created_at) if rec is not None else None) \
                or datetime.fromtimestamp(folder.stat().st_mtime, timezone.utc)
            if (now - ended).total_seconds() >= keep_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def get(self, job_id: str) -> JobRecord:
        rec = self.store.get(job_id)
        if rec is None:
            raise ApiError(404, f"no prediction with id '{job_id}'")
        return rec

    def refresh(self, job_id: str) -> JobRecord:
        """The record, brought up to date from the engine."""
        rec = self.get(job_id)
        if rec.status in FINAL or not rec.prompt_id:
            return rec
        st = self.engine.state(rec.prompt_id)
        changes: dict[str, Any] = {}
        if st.status == "running" and rec.status == "created":
            changes.update(status="processing", started_at=now_iso())
        elif st.status == "completed":
            if st.outputs:
                changes.update(status="completed", outputs=st.outputs, completed_at=now_iso(), inference_ms=st.inference_ms)
            else:
                changes.update(status="failed", completed_at=now_iso(), error="the job finished without an output video")
        elif st.status == "failed":
            changes.update(status="failed", completed_at=now_iso(), error=st.error or "the job failed")
        elif st.status == "unknown":
            saved = getattr(self.engine, "saved_outputs", None)
            outputs = saved(output_prefix(rec.id)) if saved else []
            if outputs:  # it finished, but the engine's history of it is gone (a restart)
                changes.update(status="completed", outputs=outputs, completed_at=now_iso())
            else:
                changes.update(status="failed", completed_at=now_iso(),
                               error="the job was lost (the server restarted before it finished)")
        if changes:
            self.store.update(job_id, **changes)
            rec = self.get(job_id)
        return rec

    def cancel(self, job_id: str) -> JobRecord:
        rec = self.refresh(job_id)
        if rec.status in FINAL:
            raise ApiError(409, f"prediction '{job_id}' has already ended ({rec.status}); nothing to cancel")
        if rec.status == "processing" or not self.engine.cancel(rec.prompt_id or ""):
            raise ApiError(409, f"prediction '{job_id}' is already running and cannot be cancelled")
        self.store.update(job_id, status="failed", completed_at=now_iso(), error="cancelled by the client")
        return self.get(job_id)

    @staticmethod
    def describe(rec: JobRecord, base_url: str) -> dict[str, Any]:
        """The contract's `data` object for a record; URLs are absolute on `base_url`."""
        base = base_url.rstrip("/")
        outputs = [f"{base}/view?{urlencode({'filename': o['filename'], 'subfolder': o.get('subfolder', ''), 'type': o.get('type', 'output')})}"
                   for o in rec.outputs]
        return {
            "id": rec.id,
            "model": rec.model,
            "outputs": outputs,
            "urls": {"get": f"{base}/infinitetalk/v1/predictions/{rec.id}/result"},
            "status": rec.status,
            "created_at": rec.created_at,
            "error": rec.error,
            "timings": {"inference": rec.inference_ms},
            "billed_seconds": 0 if rec.status == "failed" else rec.billed_seconds,  # failed jobs are not billed
            "seed": rec.request.get("seed"),
        }
