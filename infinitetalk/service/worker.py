"""The worker beside one ComfyUI server: claims queued jobs from the shared job store, one at a time
when its engine is idle, runs them there, and writes the result while it still holds the job's lease.

A lease lasts `lease_s` and is extended every `lease_s / 3` (heartbeat). A worker that dies stops
extending it; once it runs out another worker claims the job and re-queues it on its own server, where
the pipeline resumes from the last finished window in the (shared) job folder. After `max_attempts`
claims the job fails with a clear error instead of looping. Database outages are ridden out: the job
keeps running and the heartbeat / final write are retried until the database answers again, unless no
heartbeat got through for a whole lease (another worker may have the job then: it stops here).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from .contract import ApiError, now_iso
from .settings import DEFAULT_LEASE_S
from .jobs import CANCELLED, EngineState, JobService, output_prefix
from .outputs import OutputPublishError, produced_billing
from .staging import InputStagingError
from .store import JobRecord, StoreUnavailable

log = logging.getLogger("infinitetalk.api")
DEFAULT_MAX_ATTEMPTS = 3
_FIELDS = {f.name for f in dataclasses.fields(JobRecord)}


def new_worker_id() -> str:
    """Unique per process and readable in the database: host, pid and a random tail."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs jobs from `service.store` on `service.engine`. `tick()` is one step (tests drive it);
    `run()` loops it until `stop()`."""

    def __init__(self, service: JobService, lease_s: float = DEFAULT_LEASE_S, poll_s: float = 1.0,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, worker_id: str | None = None):
        if not lease_s > 0:
            raise ValueError(f"lease_s={lease_s!r}: expected a number of seconds > 0")
        self.service = service
        self.store = service.store
        self.engine = service.engine
        self.lease_s = float(lease_s)
        self.poll_s = min(float(poll_s), self.lease_s / 6)
        self.max_attempts = int(max_attempts)
        self.worker_id = worker_id or new_worker_id()
        self.job: JobRecord | None = None
        self.prompt_id: str | None = None
        self._beat_at = 0.0
        self._final: dict[str, Any] | None = None  # a final write still to make (the database was down)
        self._held_at = 0.0  # when the lease was last extended (monotonic): a whole lease without it = lost
        self._refunds: set[str] = set()  # jobs this live worker lost its lease of: their attempt is given back
        self._stopping = asyncio.Event()
        self._step = asyncio.Lock()   # a route's cancel and the loop's tick never interleave on one job

    async def _db(self, fn, *args, **kwargs):
        return await self.service.db(fn, *args, **kwargs)

    def _busy(self) -> bool:
        busy = getattr(self.engine, "busy", None)
        return bool(busy()) if busy else False

    async def run(self) -> None:
        log.info("InfiniteTalk worker %s started (lease %.0f s)", self.worker_id, self.lease_s)
        while not self._stopping.is_set():
            try:
                await self.tick()
            except StoreUnavailable as exc:
                log.warning("InfiniteTalk worker %s: %s; retrying", self.worker_id, exc)
            except Exception:  # noqa: BLE001 - the worker must outlive any one job's trouble
                log.exception("InfiniteTalk worker %s: unexpected error", self.worker_id)
            try:
                await asyncio.wait_for(self._stopping.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping.set()

    async def tick(self) -> None:
        """One step: finish a pending final write, else follow the current job, else claim one."""
        async with self._step:
            await self._tick()

    async def _tick(self) -> None:
        for job_id in sorted(self._refunds):   # the database answers again: give back what the outage cost
            await self._db(self.store.refund_attempt, job_id, self.worker_id)
            self._refunds.discard(job_id)
        if self._final is not None:
            await self._write_final()
        elif self.job is not None:
            await self._follow()
        elif not self._busy():
            try:
                await self._claim()
            except Exception:
                if self.job is not None and self.prompt_id is None and self._final is None:
                    log.exception("InfiniteTalk worker %s could not start job %s; it goes back to the queue when its "
                                  "lease runs out", self.worker_id, self.job.id)
                    self.job = None   # never left half-held: the next tick claims afresh
                    return
                raise

    async def _claim(self) -> None:
        rec = await self._db(self.store.claim, self.worker_id, self.lease_s)
        if rec is None:
            return
        self.job, self.prompt_id = rec, None
        self._beat_at = self._held_at = time.monotonic()
        if rec.attempts > self.max_attempts:
            lost = rec.attempts - 1
            return await self._end(status="failed", error=f"the job was given up after {lost} attempts: each "
                                   f"server that ran it stopped answering before it finished (lease of "
                                   f"{self.lease_s:.0f} s expired)")
        if rec.cancel_requested:
            return await self._end(status="failed", error=CANCELLED)
        saved = getattr(self.engine, "saved_outputs", None)
        found = saved(output_prefix(rec.id)) if saved and rec.attempts > 1 else []
        if found:   # the last owner finished the video but died before recording it: no need to run it again
            return await self._complete(found)
        if rec.attempts > 1:
            log.info("InfiniteTalk worker %s took over job %s (attempt %d; it resumes from its last finished window)",
                     self.worker_id, rec.id, rec.attempts)
        try:
            inputs = await self._holding_lease(self.service.local_inputs(rec))   # staged inputs: a download
        except InputStagingError as exc:
            return await self._end(status="failed", error=str(exc))
        if inputs is not None:   # that took a while: is the job still ours, and still wanted?
            fresh = await self._db(self.store.heartbeat, rec.id, self.worker_id, self.lease_s)
            if fresh is None:
                log.warning("InfiniteTalk worker %s lost job %s while fetching its inputs", self.worker_id, rec.id)
                self._let_go()
                return
            if fresh.cancel_requested:
                return await self._end(status="failed", error=CANCELLED)
        try:
            self.prompt_id = await self.engine.queue(self.service.graph_for(rec, inputs), rec.id)
        except Exception as exc:  # noqa: BLE001 - the record must not stay queued for a graph that cannot run
            error = exc.message if isinstance(exc, ApiError) else f"the job could not be queued ({type(exc).__name__})"
            return await self._end(status="failed", error=error)
        try:
            await self._db(self.store.fenced_update, rec.id, self.worker_id, prompt_id=self.prompt_id)
        except StoreUnavailable:
            pass  # only informational; the heartbeat keeps the lease

    async def _follow(self) -> None:
        rec, pid = self.job, self.prompt_id
        assert rec is not None and pid is not None
        if time.monotonic() - self._beat_at >= self.lease_s / 3 and not await self._heartbeat():
            return
        st: EngineState = self.engine.state(pid)
        if st.status == "running" and self.job.status == "created":
            if await self._db(self.store.fenced_update, rec.id, self.worker_id, status="processing",
                              started_at=now_iso(), cancel_requested=0):   # too late for a cancel now
                self.job.status = "processing"
        elif st.status == "completed":
            if st.outputs:
                await self._complete(st.outputs, inference_ms=st.inference_ms)
            else:
                await self._end(status="failed", error="the job finished without an output video")
        elif st.status == "failed":
            await self._end(status="failed", error=st.error or "the job failed", inference_ms=st.inference_ms)
        elif st.status == "unknown":
            saved = getattr(self.engine, "saved_outputs", None)
            found = saved(output_prefix(rec.id)) if saved else []
            if found:
                await self._complete(found)
            else:
                await self._end(status="failed", error="the job was lost (its server dropped it before it finished)")

    async def _heartbeat(self) -> bool:
        """Extend the lease; act on a cancel flag. False when the job is no longer ours (or was dropped)."""
        rec = self.job
        try:
            fresh = await self._db(self.store.heartbeat, rec.id, self.worker_id, self.lease_s)
        except StoreUnavailable as exc:
            if time.monotonic() - self._held_at < self.lease_s:
                log.warning("InfiniteTalk worker %s: heartbeat of job %s failed (%s); the job keeps running, "
                            "retrying", self.worker_id, rec.id, exc)
                return True   # retried on the next tick (no new beat time)
            log.warning("InfiniteTalk worker %s: no heartbeat of job %s for a whole lease (%.0f s; %s): another "
                        "server may run it now, so it stops here", self.worker_id, rec.id, self.lease_s, exc)
            self._let_go()
            return False
        self._beat_at = time.monotonic()
        if fresh is None:  # another worker owns it now (our lease ran out), or it ended elsewhere
            log.warning("InfiniteTalk worker %s lost the lease of job %s; dropping it here", self.worker_id, rec.id)
            self._let_go()
            return False
        self._held_at = self._beat_at
        if fresh.cancel_requested and self.engine.state(self.prompt_id).status == "queued" \
                and self.engine.cancel(self.prompt_id):
            await self._end(status="failed", error=CANCELLED)
            return False
        return True

    def _let_go(self) -> None:
        """Stop the job on this server's engine (dequeue, else interrupt) and forget it here. This worker lives,
        so its claim is not one of the job's attempts: it gives the attempt back once the database answers
        (an outage longer than the lease must not bring a job closer to being given up)."""
        if self.prompt_id is not None and not self.engine.cancel(self.prompt_id):
            stop = getattr(self.engine, "interrupt", None)
            if stop:
                stop(self.prompt_id)
        self._refunds.add(self.job.id)
        self.job = self.prompt_id = None

    async def cancel_if_mine(self, job_id: str) -> None:
        """A cancel flagged on this server for the job this worker holds: act now, not at the next beat."""
        if self.job is None or self.job.id != job_id:
            return   # not ours (checked before waiting for a step that may be a long upload)
        async with self._step:
            if self.job is not None and self.job.id == job_id and self.prompt_id and self._final is None:
                self._beat_at = float("-inf")
                await self._heartbeat()

    async def _complete(self, engine_outputs: list[dict], **changes: Any) -> None:
        """Publish the finished video (off the loop: an upload can take minutes) and record the end; a
        failed publish fails the job with its reason (and it is not billed)."""
        try:
            outputs = await self._holding_lease(asyncio.get_running_loop().run_in_executor(
                None, self.service.outputs.publish, self.job.id, engine_outputs))
        except Exception as exc:  # noqa: BLE001 - OutputPublishError or a storage client's own error
            log.error("InfiniteTalk worker %s: publishing job %s failed: %s", self.worker_id, self.job.id, exc)
            message = str(exc) if isinstance(exc, OutputPublishError) else \
                f"the finished video could not be published ({type(exc).__name__})"
            return await self._end(status="failed", outputs=[], error=message, **changes)
        billing = await asyncio.get_running_loop().run_in_executor(None, produced_billing, self.service.outputs,
                                                                   engine_outputs)   # bill what was produced
        await self._end(status="completed", outputs=outputs, **billing, **changes)

    async def _holding_lease(self, work: Awaitable[Any]) -> Any:
        """Await `work` (an upload or a download: it can outlast the lease) while extending the job's lease every
        third of it; a lost lease is logged (the caller's next heartbeat or fenced write finds it out)."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.lease_s / 3)
            if done:
                return task.result()
            try:
                held = await self._db(self.store.heartbeat, self.job.id, self.worker_id, self.lease_s)
            except StoreUnavailable as exc:
                log.warning("InfiniteTalk worker %s: heartbeat of job %s failed during its upload (%s)",
                            self.worker_id, self.job.id, exc)
                continue
            if held is None:
                log.warning("InfiniteTalk worker %s lost the lease of job %s", self.worker_id, self.job.id)
            else:
                self._beat_at = self._held_at = time.monotonic()

    async def _end(self, **changes: Any) -> None:
        self._final = {**changes, "completed_at": now_iso(), "lease_expires_at": None}
        await self._write_final()

    async def _write_final(self) -> None:
        rec = self.job
        written = self._final
        try:
            held = await self._db(self.store.fenced_update, rec.id, self.worker_id, **written)
        except StoreUnavailable as exc:
            log.warning("InfiniteTalk worker %s: could not record the end of job %s (%s); retrying",
                        self.worker_id, rec.id, exc)
            return
        self._final = None
        self.job = self.prompt_id = None
        if not held:
            log.warning("InfiniteTalk worker %s: job %s was taken over before its end was recorded; the new "
                        "owner's result stands", self.worker_id, rec.id)
            return
        try:
            final = await self._db(self.store.get, rec.id)
        except StoreUnavailable:   # recorded, but not readable now: tell from what was written
            final = dataclasses.replace(rec, **{k: v for k, v in written.items() if k in _FIELDS})
        if final is not None:
            await self.service.notify_final(final)
