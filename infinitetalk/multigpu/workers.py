"""The ComfyUI worker pool: `gpus` > 1 on the model loader runs each window's sampling on N processes.

The ComfyUI process stays what it is (reads inputs, encodes audio/text/CLIP, decodes, writes the mp4,
progress, previews, Cancel) and holds every model but the DiT. The pool starts N worker processes once
(`python -m infinitetalk.multigpu.workers`, one per device, rank r on `cuda:r`), each loading only the DiT;
they form their own torch.distributed world (loopback TCP rendezvous, 127.0.0.1) exactly like torchrun
ranks, and are kept for later jobs. Per window the ComfyUI process sends the same `WindowJob` to every
worker over an authenticated loopback connection; all workers sample it together (a collective); worker 0
reports each step and returns the latent.

A worker that dies (or reports an error) fails the job at once with `WorkerLost` naming the worker and its
exit code; the pool is then stopped and starts afresh on the next job. Cancel reaches the workers between
steps (they agree on the step with one tiny all-reduce, so none is left inside a collective).
"""
from __future__ import annotations

import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path

import torch

from ..errors import InputError, JobCancelled, WorkerLost
from ..pipeline.models import load_models
from ..runtime.budget import JobShape
from ..runtime.plan import job_on_rank
from .launch import World, WindowJob, guidance_batch, launch_env, place_for, rank_device, sample_job

__all__ = ["WorkerPool", "FRONT_COMPONENTS", "STARTUP_TIMEOUT_S"]

FRONT_COMPONENTS = ("wav2vec2", "text_encoder", "clip_vision", "vae")   # what the ComfyUI process keeps with a pool

STARTUP_TIMEOUT_S = float(os.environ.get("INFINITETALK_WORKER_STARTUP_S", "900"))
_ADDRESS_ENV, _KEY_ENV = "INFINITETALK_POOL_ADDRESS", "INFINITETALK_POOL_KEY"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the folder holding `infinitetalk/`


def _send(conn: Connection, message: tuple) -> None:
    """Plain pickle (tensors by value): torch's ForkingPickler reductions would pass shared-memory handles."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection) -> tuple:
    return pickle.loads(conn.recv_bytes())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerPool:
    """N processes that hold the DiT and sample windows together: a `pipeline.sampler.WindowSampler` for
    `generate(..., sampler=)`.

    `load_kwargs`: keyword arguments of `pipeline.models.load_models` (models folder, preset, dtype,
    overrides, runtime options); the device is each worker's own. `device_type`: "cuda" (worker r on
    cuda:r) or "cpu" (tests and CPU-only machines)."""

    step_skipping = False   # TeaCache state is not carried to the workers

    def __init__(self, size: int, load_kwargs: dict, device_type: str = "cuda"):
        if int(size) < 2:
            raise InputError("gpus", f"{size}: a worker pool needs 2 or more processes (1 = no pool)")
        if device_type == "cuda" and torch.cuda.device_count() < size:
            raise InputError("gpus", f"{size} but only {torch.cuda.device_count()} CUDA devices are visible")
        self.size, self.load_kwargs, self.device_type = int(size), dict(load_kwargs), device_type
        self.processes: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.starts = 0                 # how many times the workers were started (restarts after a death)
        self._lock = threading.Lock()

    def job_share(self, job: JobShape, num_heads: int | None) -> JobShape:
        """The share of a window each worker computes (each plans its own memory for it; the front holds no
        DiT and plans nothing)."""
        return job_on_rank(job, self.size, True, num_heads)

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def start(self) -> None:
        """Start the workers if they are not running (idempotent); returns once every worker holds the DiT."""
        if self.alive:
            return
        self.close()
        key = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = listener.address
        master_port = _free_port()
        env_base = dict(os.environ)
        env_base["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env_base.get("PYTHONPATH")) if p)
        env_base.update({_ADDRESS_ENV: f"{host}:{port}", _KEY_ENV: key.hex(), "WORLD_SIZE": str(self.size),
                         "LOCAL_WORLD_SIZE": str(self.size), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(master_port)})
        if self.device_type == "cpu" and "OMP_NUM_THREADS" not in env_base:   # share the cores, as torchrun does:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            env_base["OMP_NUM_THREADS"] = str(max(1, cores // self.size))   # oversubscribed gloo ranks crawl
        self.starts += 1
        for rank in range(self.size):
            env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank))
            self.processes.append(subprocess.Popen([sys.executable, "-m", "infinitetalk.multigpu.workers"], env=env,
                                                   stdin=subprocess.DEVNULL))
        try:
            self.conns = self._accept(listener)
            for conn in self.conns:
                _send(conn, ("load", self.load_kwargs, self.device_type))
            self._collect({"ready"}, STARTUP_TIMEOUT_S, "starting")
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def _accept(self, listener: Listener) -> list[Connection]:
        """One connection per worker, ordered by rank; WorkerLost if a worker exits before connecting."""
        accepted: dict[int, Connection] = {}
        errors: list[BaseException] = []

        def accept_all() -> None:
            try:
                while len(accepted) < self.size:
                    conn = listener.accept()
                    kind, rank = _receive(conn)[:2]
                    accepted[int(rank)] = conn
            except BaseException as err:   # noqa: BLE001 - the listener was closed or a worker misbehaved
                errors.append(err)

        thread = threading.Thread(target=accept_all, daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while thread.is_alive():
            thread.join(0.2)
            self._check_processes("starting")
            if time.monotonic() > deadline:
                raise WorkerLost(f"the {self.size} InfiniteTalk workers did not connect within "
                                 f"{STARTUP_TIMEOUT_S:.0f} s")
        if errors:
            raise WorkerLost(f"starting the InfiniteTalk workers failed: {errors[0]}")
        return [accepted[r] for r in range(self.size)]

    def close(self) -> None:
        """Stop every worker (a polite stop first, then kill); the next job starts a fresh pool."""
        for conn in self.conns:
            try:
                _send(conn, ("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    # -- failure handling --------------------------------------------------------------------------
    def _check_processes(self, doing: str, grace_s: float = 0.0, reporter: int | None = None) -> None:
        """WorkerLost naming the first worker that exited (waiting up to `grace_s` for one to do so), other than
        `reporter` (a worker that reported an error and exits on its own)."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, p in enumerate(self.processes):
                code = None if rank == reporter else p.poll()
                if code is not None:
                    self._fail(rank, f"died (exit code {code})", doing)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _fail(self, rank: int, what: str, doing: str, detail: str = ""):
        device = f"cuda:{rank}" if self.device_type == "cuda" else "cpu"
        self.close()
        raise WorkerLost(f"InfiniteTalk worker {rank} ({device}) {what} while {doing}; the job failed and the "
                         f"{self.size} workers will be restarted by the next job (finished windows are kept "
                         f"for resume){': ' + detail if detail else ''}")

    def _collect(self, kinds: set[str], timeout_s: float | None, doing: str, on_message=None) -> dict[int, tuple]:
        """Wait until every worker sent a message of one of `kinds`; returns them by rank. A closed connection
        (a dead worker) or an "error" message fails the job at once."""
        replies: dict[int, tuple] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(replies) < self.size:
            pending = [c for r, c in enumerate(self.conns) if r not in replies]
            ready = wait(pending, timeout=1.0)
            if not ready:
                self._check_processes(doing)
                if deadline is not None and time.monotonic() > deadline:
                    self._fail(0, f"did not answer within {timeout_s:.0f} s", doing)
                continue
            for conn in ready:
                rank = self.conns.index(conn)
                try:
                    message = _receive(conn)
                except (EOFError, OSError):
                    p = self.processes[rank]
                    try:
                        code = p.wait(2.0)
                    except subprocess.TimeoutExpired:
                        code = None
                    self._fail(rank, "died" + (f" (exit code {code})" if code is not None else ""), doing)
                if message[0] == "error":   # often a survivor's collective failing because a peer died
                    self._check_processes(doing, grace_s=3.0, reporter=rank)
                    self._fail(rank, "failed", doing, message[1])
                if message[0] in kinds:
                    replies[rank] = message
                elif on_message is not None:
                    on_message(rank, message)
        return replies

    # -- sampling (sample_window's signature) -------------------------------------------------------
    def __call__(self, dit, noise, cond, times, guidance, motion, keep=None, on_step=None) -> torch.Tensor:
        """Sample one window on the workers; `dit` is ignored (the workers hold it). JobCancelled from
        `on_step` stops the workers at the same step before it propagates."""
        with self._lock:
            self.start()
            try:
                return self._sample(WindowJob(noise=noise, cond=cond, times=times, guidance=guidance,
                                              motion=motion, keep=keep), on_step)
            except (WorkerLost, JobCancelled, InputError):
                raise
            except BaseException:   # the workers may still be inside the window: start afresh next time
                self.close()
                raise

    def _sample(self, job: WindowJob, on_step) -> torch.Tensor:
        for conn in self.conns:
            _send(conn, ("window", job.to("cpu")))
        cancelled: list[BaseException] = []

        def on_message(rank: int, message: tuple) -> None:
            if message[0] == "step" and on_step is not None and not cancelled:
                try:
                    on_step(int(message[1]))
                except JobCancelled as err:
                    cancelled.append(err)
                    for conn in self.conns:
                        _send(conn, ("cancel",))

        replies = self._collect({"result", "cancelled", "refused"}, None, "sampling a window", on_message)
        if cancelled:
            raise cancelled[0]
        refusals = [r[1] for r in replies.values() if r[0] == "refused" and r[1]]
        if refusals:
            raise InputError("vram", f"this job does not fit a worker's VRAM budget:\n{refusals[0]}")
        return replies[0][1].to(job.noise.device)


# -- the worker process -------------------------------------------------------------------------------
def _worker_main() -> int:
    """One pool worker: connect to the ComfyUI process, load the DiT, join the world, sample until told to stop."""
    host, port = os.environ[_ADDRESS_ENV].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(_KEY_ENV)))
    env = launch_env()
    _send(conn, ("hello", env.rank))
    world = None
    try:
        _, load_kwargs, device_type = _receive(conn)
        world = World.join(rank_device(env, device_type))
        models = load_models(**load_kwargs, device=world.device, components=("dit",))
        _send(conn, ("ready", env.rank))
        shape = None
        while True:
            message = _receive(conn)
            if message[0] == "stop":
                world.finished = True   # every worker is told to stop: leave the group together
                return 0
            if message[0] == "cancel":   # arrived after the window ended: nothing to stop
                continue
            job = message[1].to(world.device)
            shape = place_for(models, job, shape, world.parallel)
            plan = getattr(models, "plan", None)
            if world.agree(plan is not None and not plan.fits):   # every worker refuses together
                _send(conn, ("refused", plan.text() if plan is not None and not plan.fits else ""))
                continue
            try:
                latent = sample_job(models.dit, job, world.parallel, _step_hook(conn, world), guidance_batch(models))
            except JobCancelled:
                _send(conn, ("cancelled",))
                continue
            _send(conn, ("result", latent.cpu() if world.is_main else None))
    except (EOFError, OSError):   # the ComfyUI process went away
        return 1
    except BaseException:   # noqa: BLE001 - reported to the ComfyUI process, which fails the job
        try:
            _send(conn, ("error", traceback.format_exc(limit=8)))
        except OSError:
            pass
        return 1
    finally:
        if world is not None:
            world.close()


def _step_hook(conn: Connection, world):
    """After each step: worker 0 reports progress; all workers agree whether a cancel arrived."""
    seen = [False]

    def on_step(i: int) -> None:
        while not seen[0] and conn.poll():
            seen[0] = _receive(conn)[0] == "cancel"
        if world.agree(seen[0]):
            raise JobCancelled("cancelled between steps")
        if world.is_main:
            _send(conn, ("step", i))

    return on_step


if __name__ == "__main__":
    sys.exit(_worker_main())
