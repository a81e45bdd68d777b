"""Several processes, one job: `torchrun --nproc-per-node N -m infinitetalk generate ...` and the ComfyUI pool.

Windows depend on each other (the next window starts from this one's last frames), so only the work inside
a window is spread: rank 0 alone reads the inputs, encodes audio/text/CLIP, writes the job folder, the
progress bar and the mp4; for each window it sends the window's conditioning (`WindowJob`, on the CPU,
over a gloo "control" group) to every other rank, then all ranks call `sample_window(..., parallel=state)`
together (a collective: equal arguments, equal latent on every rank). Ranks ≠ 0 hold only the DiT
(`follow`). NCCL carries the DiT's collectives on GPUs, gloo on CPUs.

Failures stay bounded: DiT collectives use a short timeout (INFINITETALK_COLLECTIVE_TIMEOUT_S, default
300 s), the wait for the next window a long one (INFINITETALK_CONTROL_TIMEOUT_S, default 3600 s: rank 0
may be decoding a long window meanwhile). A rank that dies turns into `WorkerLost` on rank 0 (a gloo
connection error, a timeout, or torchrun's SIGTERM to the survivors); the job folder keeps every finished
window and nothing appears under the output name, so rerunning the command resumes.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from ..errors import InputError, WorkerLost
from ..ops.parallel import guidance_layout, init_parallel
from ..pipeline.sampler import Guidance, KeepRegion, WindowConditioning, sample_window
from ..runtime.budget import JobShape
from ..runtime.plan import job_on_rank

__all__ = ["LaunchEnv", "launch_env", "rank_device", "WindowJob", "World", "LeaderSampler", "follow", "sample_job",
           "job_shape", "place_for", "collective_failure", "join_as_leader", "run_follower", "stop_on_sigterm",
           "COLLECTIVE_TIMEOUT_S", "CONTROL_TIMEOUT_S"]

COLLECTIVE_TIMEOUT_S = float(os.environ.get("INFINITETALK_COLLECTIVE_TIMEOUT_S", "300"))
CONTROL_TIMEOUT_S = float(os.environ.get("INFINITETALK_CONTROL_TIMEOUT_S", "3600"))
GOODBYE_TIMEOUT_S = 10.0    # the closing barrier of a run that ended normally


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a torchrun world (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 does all I/O."""
        return self.rank == 0


def launch_env(environ: dict | None = None) -> LaunchEnv | None:
    """The torchrun world this process belongs to, or None for a plain single process (no WORLD_SIZE, or 1)."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise InputError(name, "is not set; start multi-process runs with torchrun "
                                   "(torchrun --nproc-per-node N -m infinitetalk generate ...)")
        values[name] = env[name]
    try:
        rank, world, local = int(values["RANK"]), int(values["WORLD_SIZE"]), int(values["LOCAL_RANK"])
    except ValueError as err:
        raise InputError("RANK", f"torchrun variables must be integers, found {values}") from err
    if not 0 <= rank < world:
        raise InputError("RANK", f"{rank} is outside 0 .. WORLD_SIZE-1 = {world - 1}")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local)


def rank_device(env: LaunchEnv, device: str | torch.device | None = None) -> torch.device:
    """The device of this rank: `cuda:LOCAL_RANK` when the job runs on CUDA, else the CPU.

    An explicit `cuda:k` is ignored under torchrun (every rank would land on GPU k)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        return torch.device(kind)
    if env.local_rank >= torch.cuda.device_count():
        raise InputError("nproc-per-node", f"local rank {env.local_rank} has no GPU: only "
                                           f"{torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", env.local_rank)


def _moved(obj, device: torch.device | str):
    """A dataclass of tensors with every tensor field moved to `device` (dtypes kept)."""
    if obj is None:
        return None
    return replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})


@dataclass
class WindowJob:
    """Everything `sample_window` needs for one window: what rank 0 sends to the other ranks."""

    noise: torch.Tensor
    cond: WindowConditioning
    times: torch.Tensor
    guidance: Guidance
    motion: torch.Tensor
    keep: KeepRegion | None = None

    def to(self, device: torch.device | str) -> WindowJob:
        return WindowJob(noise=self.noise.to(device), cond=_moved(self.cond, device), times=self.times.to(device),
                         guidance=self.guidance, motion=self.motion.to(device), keep=_moved(self.keep, device))


def guidance_batch(models) -> int:
    """Guidance calls per DiT pass this rank's memory plan allows (1 without a plan)."""
    placement = getattr(models, "placement", None)
    return 1 if placement is None else int(placement.max_guidance_batch)


def sample_job(dit: torch.nn.Module, job: WindowJob, parallel, on_step: Callable[[int], None] | None = None,
               batch: int = 1) -> torch.Tensor:
    """Sample one window on this rank: a collective over `parallel` (every rank returns the same latent)."""
    return sample_window(dit, job.noise, job.cond, job.times, job.guidance, job.motion, keep=job.keep,
                         on_step=on_step, batch=batch, parallel=parallel)


def collective_failure(err: BaseException) -> bool:
    """Whether `err` comes from a torch.distributed collective (a peer died, hung or closed its connection)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(w in text for w in (
        "gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset", "timed out", "Timeout"))


class World:
    """The joined process world: the parallel DiT state (ops/parallel.py) plus a gloo control group that
    carries the window jobs and small agreements."""

    def __init__(self, rank: int, world_size: int, device: torch.device, parallel, control):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.parallel = parallel     # ops.parallel.ParallelState: the DiT's groups (Ulysses, guidance)
        self.control = control
        self.leads = False           # rank 0 of a torchrun job: tells the followers when the run is over
        self.finished = False        # the end of the run was sent / received: every rank is alive to say goodbye
        self.closed = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device, guidance_parallel: bool = True) -> World:
        """Join the world described by the torchrun env variables (a collective over all ranks)."""
        env = launch_env()
        if env is None:
            raise InputError("WORLD_SIZE", "a multi-process run needs WORLD_SIZE > 1 (start it with torchrun)")
        parallel = init_parallel(device=device, guidance_parallel=guidance_parallel, timeout_s=COLLECTIVE_TIMEOUT_S)
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
        return cls(env.rank, env.world_size, device, parallel, control)

    # -- window jobs (rank 0 -> every rank) ---------------------------------------------------------
    def send_job(self, job: WindowJob | None) -> None:
        """Rank 0: hand the next window (None = the run is over) to every other rank."""
        payload = [None if job is None else job.to("cpu")]
        dist.broadcast_object_list(payload, src=0, group=self.control)
        self.finished = job is None

    def receive_job(self) -> WindowJob | None:
        """Ranks ≠ 0: wait for rank 0's next window (None = the run is over)."""
        payload = [None]
        dist.broadcast_object_list(payload, src=0, group=self.control)
        self.finished = payload[0] is None
        return None if payload[0] is None else payload[0].to(self.device)

    def agree(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (e.g. a cancel seen by one rank)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def close(self) -> None:
        """The leading rank tells the followers to stop; everyone leaves the process group. Never raises (a
        dead peer must not hide the job's own error)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.leads:
                self.send_job(None)
            if self.finished:   # a normal end: nobody tears the group down while a peer still talks on it
                dist.monitored_barrier(group=self.control, timeout=datetime.timedelta(seconds=GOODBYE_TIMEOUT_S))
        except Exception:   # noqa: BLE001 - a peer is gone: nothing left to tell it
            pass
        try:
            self.parallel.shutdown()
        except Exception:   # noqa: BLE001
            pass


class LeaderSampler:
    """Rank 0's `sample_window`: send the window to every rank, then sample it together with them.

    Handed to `generate(..., sampler=)` (a `pipeline.sampler.WindowSampler`), so the pipeline runs unchanged
    on rank 0; `models` (rank 0's bundle) gives the guidance batch its memory plan allows."""

    step_skipping = False   # TeaCache state is not carried to the other ranks

    def __init__(self, world: World, models=None):
        self.world, self.models = world, models

    def job_share(self, job: JobShape, num_heads: int | None) -> JobShape:
        """The share of a window rank 0 computes (its guidance group's calls on its token shard): what its
        memory plan is for."""
        return job_on_rank(job, self.world.world_size, self.world.parallel.guidance_parallel, num_heads)

    def __call__(self, dit, noise, cond, times, guidance, motion, keep=None, on_step=None) -> torch.Tensor:
        job = WindowJob(noise=noise, cond=cond, times=times, guidance=guidance, motion=motion, keep=keep)
        self._check_world_size(dit, guidance)
        try:
            self.world.send_job(job)
            return sample_job(dit, job, self.world.parallel, on_step, guidance_batch(self.models))
        except Exception as err:
            if collective_failure(err):
                raise WorkerLost(f"the sampling of a window failed on rank 0 because another rank stopped "
                                 f"answering ({type(err).__name__}: {str(err)[:300]}); see that rank's log. "
                                 "Finished windows are kept: rerun the same command to resume") from err
            raise

    def _check_world_size(self, dit, guidance: Guidance) -> None:
        """InputError before any rank starts the window when its sequence groups cannot split the heads."""
        world, calls, grouped = self.world.world_size, guidance.calls_per_step, self.world.parallel.guidance_parallel
        heads = _heads_of(dit)
        try:   # the layout the ranks will use (uneven guidance groups included)
            guidance_layout(world, calls, grouped, heads)
        except InputError as err:
            groups, size = guidance_layout(world, calls, grouped)
            raise InputError("nproc-per-node", f"{world} ranks make {groups} guidance group(s) of {size}, which "
                                               f"cannot split the DiT's {heads} attention heads (nor can any other "
                                               "grouping of them); use a world size listed in docs/multi-gpu.md"
                             ) from err


def job_shape(job: WindowJob, parallel=None, num_heads: int | None = None) -> JobShape:
    """The memory-planning shape of a window (runtime/budget.py JobShape), read from its latent: with
    `parallel` (an ops.parallel.ParallelState) this rank's share of it (runtime/plan.py `job_on_rank`)."""
    _, t, h, w = job.noise.shape
    whole = JobShape.for_window(8 * h, 8 * w, 4 * (t - 1) + 1, job.guidance.calls_per_step)
    if parallel is None:
        return whole
    return job_on_rank(whole, parallel.world_size, parallel.guidance_parallel, num_heads)


def place_for(models, job: WindowJob, shape, parallel=None):
    """Redo `models`' memory plan (VRAM budget, block streaming) for this rank's share of the window
    (`parallel`: the world's ParallelState) when a window of a new size arrives, as rank 0 does in generate;
    returns the shape now planned for."""
    new = job_shape(job, parallel, _heads_of(getattr(models, "dit", None)))
    if new != shape and hasattr(models, "prepare"):
        models.prepare(new)
    return new


def _heads_of(dit) -> int | None:
    config = getattr(dit, "config", None)
    return getattr(config, "num_heads", None)


def follow(world: World, models) -> int:
    """Ranks ≠ 0: sample every window rank 0 sends until it says the run is over; returns the window count.
    `models`: a ModelBundle holding only the DiT."""
    count, shape = 0, None
    while (job := world.receive_job()) is not None:
        shape = place_for(models, job, shape, world.parallel)
        sample_job(models.dit, job, world.parallel, batch=guidance_batch(models))
        count += 1
    return count


def stop_on_sigterm() -> None:
    """Turn SIGTERM (torchrun ends the survivors when one rank fails) into WorkerLost on this rank, so the
    CLI reports it clearly instead of vanishing."""
    def handler(signum, frame):
        raise WorkerLost("stopped by SIGTERM: torchrun ends every rank when one fails (see its report of the "
                         "failed rank). Finished windows are kept: rerun the same command to resume")

    signal.signal(signal.SIGTERM, handler)


def run_follower(load_dit: Callable[[torch.device], object], device: str | None = None) -> int:
    """Main of a rank ≠ 0 under torchrun: join, load only the DiT (`load_dit(device)` -> a ModelBundle whose
    other components are None; safetensors are memory-mapped), follow rank 0. Prints only errors (prefixed
    by the rank); returns the process exit code."""
    env = launch_env()
    assert env is not None and not env.is_main
    world = None
    try:
        world = World.join(rank_device(env, device))
        follow(world, load_dit(world.device))
        return 0
    except Exception as err:   # noqa: BLE001 - reported, and the non-zero exit makes torchrun stop the job
        print(f"rank {env.rank}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        if world is not None:
            world.close()


def join_as_leader(device: str | torch.device | None = None) -> World:
    """Rank 0 under torchrun: join the world on this rank's device; SIGTERM becomes WorkerLost."""
    env = launch_env()
    assert env is not None and env.is_main
    world = World.join(rank_device(env, device))
    world.leads = True
    stop_on_sigterm()
    return world
