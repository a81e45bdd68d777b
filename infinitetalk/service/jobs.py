"""Job lifecycle: submit (validate, fetch, probe, queue), status, result, cancel.

The engine is whatever runs graphs — ComfyUI's own prompt queue in production (`comfy_engine.py`),
a fake in tests — behind a four-method protocol, so this module runs without ComfyUI.
"""
from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from ..errors import InputError
from .contract import MAX_SECONDS, ApiError, audio_seconds_for, billed_seconds, now_iso, validate_request
from .graph import build_graph
from .inputs import InputSettings, resolve_media
from .store import JobRecord, JobStore

FINAL = ("completed", "failed")


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


def output_prefix(job_id: str) -> str:
    """Where a job's videos go in the output folder (ComfyUI adds a counter)."""
    return f"infinitetalk_api/{job_id}"


def _probe(field: str, path: Path) -> float | None:
    """Decode/inspect one input now, so broken files and over-long audio fail at submit time."""
    if field.endswith("audio"):
        from ..audio.io import load_audio

        clip = load_audio(path, name=field)
        return clip.samples.shape[-1] / clip.sample_rate
    if field == "video":
        from ..video.reader import VideoSource

        VideoSource(path)
        return None
    from ..video.reader import load_image

    load_image(path)
    return None


class JobService:
    def __init__(self, store: JobStore, engine: Engine, settings: InputSettings, workflows: dict[str, dict]):
        self.store = store
        self.engine = engine
        self.settings = settings
        self.workflows = workflows

    async def submit(self, kind: str, body: Any) -> JobRecord:
        req = validate_request(kind, body)
        job_id = uuid.uuid4().hex
        local: dict[str, Path] = {}
        for field_name, value in req.media.items():
            local[field_name] = await resolve_media(job_id, field_name, value, self.settings)
        loop = asyncio.get_running_loop()
        seconds: dict[str, float | None] = {}
        for field_name, path in local.items():
            try:
                seconds[field_name] = await loop.run_in_executor(None, _probe, field_name, path)
            except InputError as exc:
                detail = str(exc).removeprefix(f"{exc.input_name}: ")  # the field is named once
                raise ApiError(400, f"field '{field_name}': {detail}") from exc
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
        graph = build_graph(self.workflows[kind], params, filename_prefix=output_prefix(job_id))
        record = JobRecord(id=job_id, model=req.model, request={**req.to_json(), "seed": seed}, status="created",
                           created_at=now_iso(), video_seconds=total, billed_seconds=billed_seconds(total))
        self.store.insert(record)
        try:
            prompt_id = await self.engine.queue(graph, job_id)
        except ApiError as exc:
            self.store.update(job_id, status="failed", completed_at=now_iso(), error=exc.message)
            raise
        self.store.update(job_id, prompt_id=prompt_id)
        record.prompt_id = prompt_id
        return record

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
            "billed_seconds": rec.billed_seconds,
            "seed": rec.request.get("seed"),
        }
