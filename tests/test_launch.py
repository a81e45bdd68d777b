"""Multi-process jobs on the CPU (gloo) with the tiny models: torchrun `generate` against the single process,
a rank killed mid-job and the resume after it, and the ComfyUI worker pool (reuse, a dead worker, restart).

The end-to-end runs start real processes (torchrun, pool workers), so they are marked slow; the windows are
tiny (32×32, 21 frames, 1–2 steps) and every subprocess has a timeout.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infinitetalk.audio.io import write_wav
from infinitetalk.demo import synthetic_voice, two_faces_image, write_png
from infinitetalk.errors import InputError, JobCancelled, WorkerLost
from infinitetalk.pipeline.generate import generate
from infinitetalk.pipeline.request import GenerationRequest
from infinitetalk.pipeline.sampler import Guidance, KeepRegion, WindowConditioning
from infinitetalk.multigpu.launch import WindowJob, job_shape, launch_env
from infinitetalk.ops.options import RuntimeOptions
from infinitetalk.files import partial_path

ROOT = Path(__file__).resolve().parents[1]
RATE = 22050
SMALL = dict(size_scale=0.05, frame_num=21, motion_frames=5)
RUN_TIMEOUT_S = 300


# -- fast unit checks ---------------------------------------------------------------------------------------
def test_launch_env_reads_torchrun_variables_and_names_what_is_wrong():
    assert launch_env({}) is None and launch_env({"WORLD_SIZE": "1"}) is None
    env = launch_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (1, 2, 1, False)
    with pytest.raises(InputError, match="MASTER_PORT"):
        launch_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    with pytest.raises(InputError, match="3 is outside"):
        launch_env({"WORLD_SIZE": "2", "RANK": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_window_job_travels_by_value_with_dtypes_and_shape():
    g = torch.Generator().manual_seed(0)
    cond = WindowConditioning(context=torch.randn(3, 8, generator=g), context_null=torch.randn(2, 8, generator=g),
                              clip_fea=torch.randn(1, 4, 6, generator=g).half(),
                              y=torch.randn(20, 2, 4, 6, generator=g), audio=torch.randn(2, 5, 5, 3, 4, generator=g),
                              ref_target_masks=torch.rand(3, 4, 6, generator=g))
    keep = KeepRegion(latents=torch.randn(16, 2, 4, 6, generator=g), mask=torch.rand(1, 1, 4, 6, generator=g))
    job = WindowJob(noise=torch.randn(16, 2, 4, 6, generator=g), cond=cond, times=torch.linspace(1000, 0, 3),
                    guidance=Guidance(5.0, 4.0), motion=torch.randn(16, 1, 4, 6, generator=g), keep=keep)
    back = pickle.loads(pickle.dumps(job.to("cpu")))
    assert back.cond.clip_fea.dtype == torch.float16 and back.guidance == job.guidance
    for a, b in ((job.noise, back.noise), (job.cond.audio, back.cond.audio), (job.keep.mask, back.keep.mask)):
        assert torch.equal(a, b)
    shape = job_shape(job)
    assert (shape.height, shape.width) == (32, 48)   # latent 4×6 -> pixels ×8


def test_every_world_size_gets_a_layout_for_both_presets_of_the_40_head_dit():
    """3 ranks with the fast preset (2 calls) used to be refused: one group of 3 cannot split 40 heads."""
    from types import SimpleNamespace

    from infinitetalk.multigpu.launch import LeaderSampler
    from infinitetalk.ops.parallel import guidance_layout

    dit = SimpleNamespace(config=SimpleNamespace(num_heads=40))
    for world_size in range(2, 17):
        for guidance in (Guidance(1.0, 2.0), Guidance(5.0, 4.0)):
            world = SimpleNamespace(world_size=world_size, parallel=SimpleNamespace(guidance_parallel=True))
            LeaderSampler(world)._check_world_size(dit, guidance)
            groups, size = guidance_layout(world_size, guidance.calls_per_step, num_heads=40)
            assert groups * size <= world_size and 40 % size == 0 and groups <= guidance.calls_per_step


def test_every_rank_plans_for_its_share_of_the_window():
    """Followers (`place_for`) and rank 0 (`generate` with a LeaderSampler) plan for their guidance group's
    calls on their token shard (runtime/plan.py `job_on_rank`), not for the whole window."""
    from types import SimpleNamespace

    from infinitetalk.multigpu.launch import LeaderSampler, place_for
    from infinitetalk.pipeline import generate as generate_module

    planned = []
    plan = SimpleNamespace(fits=True, text=lambda: "plan")
    models = SimpleNamespace(dit=SimpleNamespace(config=SimpleNamespace(num_heads=40)),
                             prepare=lambda shape: planned.append(shape) or plan)
    job = WindowJob(noise=torch.zeros(16, 21, 60, 104), cond=None, times=torch.zeros(2), guidance=Guidance(1.0, 2.0),
                    motion=torch.zeros(16, 1, 60, 104))
    whole = job_shape(job)
    assert (whole.calls_per_step, whole.sequence_ranks) == (2, 1)
    for world_size, calls, split in ((2, 1, 1), (4, 1, 2), (8, 1, 4)):   # 2 guidance groups of P ranks
        parallel = SimpleNamespace(world_size=world_size, guidance_parallel=True)
        planned.clear()
        shape = place_for(models, job, None, parallel)
        assert planned == [shape] and (shape.calls_per_step, shape.sequence_ranks) == (calls, split)
        assert shape.tokens == whole.tokens and shape.local_tokens == -(-whole.tokens // split)
        assert place_for(models, job, shape, parallel) == shape and len(planned) == 1   # same size: no new plan

        world = SimpleNamespace(world_size=world_size, parallel=parallel)
        req = SimpleNamespace(text_guidance=1.0, audio_guidance=2.0, teacache=0)
        inputs = SimpleNamespace(size=(480, 832), plan=SimpleNamespace(frame_num=81))
        generate_module._place_for_job(models, req, inputs, LeaderSampler(world, models))
        assert planned[-1] == shape   # rank 0 plans what its followers plan
    generate_module._place_for_job(models, req, inputs, None)
    assert planned[-1] == whole   # one process: the whole window


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("launch_media")
    return {
        "image": write_png(d / "two.png", two_faces_image(128, 192)),
        "left": write_wav(d / "left.wav", synthetic_voice(0.6, 120.0, RATE, seed=1)[None], RATE),
        "right": write_wav(d / "right.wav", synthetic_voice(0.6, 200.0, RATE, seed=2)[None], RATE),
        "left_long": write_wav(d / "left_long.wav", synthetic_voice(1.5, 120.0, RATE, seed=3)[None], RATE),
        "right_long": write_wav(d / "right_long.wav", synthetic_voice(1.5, 200.0, RATE, seed=4)[None], RATE),
    }


@pytest.fixture(scope="module")
def models(tiny_models):
    from infinitetalk.pipeline.models import load_models

    return load_models(tiny_models, preset="quality", device="cpu", dtype="fp32")


def _decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(video frames [N, H, W, 3] uint8, audio samples [C, T] float)."""
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=-1)
    return frames, audio


def _assert_same_video(path: Path, reference: Path) -> None:
    """Same frame count, decoded pixels within 2/255, same audio."""
    frames, audio = _decoded(path)
    ref_frames, ref_audio = _decoded(reference)
    assert frames.shape == ref_frames.shape
    diff = int(np.abs(frames.astype(np.int16) - ref_frames.astype(np.int16)).max())
    assert diff <= 2, f"decoded frames differ by up to {diff}/255"
    assert audio.shape == ref_audio.shape and np.allclose(audio, ref_audio, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_command(models_dir: Path, media: dict, out: Path, job_dir: Path | None = None) -> list[str]:
    """`generate` on 2 ranks with the reference's settings (crf 0: the comparison sees the model's numbers,
    not h264's reaction to a 1/255 change)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "infinitetalk", "generate", "--models", str(models_dir),
           "--image", str(media["image"]), "--left-audio", str(media["left_long"]),
           "--right-audio", str(media["right_long"]), "--out", str(out), "--seed", "7", "--steps", "2", "--crf", "0",
           "--size-scale", "0.05", "--frame-num", "21", "--motion-frames", "5", "--quiet"]
    return cmd + (["--job-dir", str(job_dir), "--keep-job"] if job_dir is not None else [])


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", INFINITETALK_COLLECTIVE_TIMEOUT_S="60")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def reference(models, media, tmp_path_factory):
    """The single-process run the multi-process runs must reproduce (5 windows), on one thread like each rank
    (OMP_NUM_THREADS=1): another thread count sums in another order, and the random tiny model carries that
    rounding from window to window through the motion frames."""
    out = tmp_path_factory.mktemp("launch_reference") / "single.mp4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate(GenerationRequest(left_audio=media["left_long"], right_audio=media["right_long"],
                                          image=media["image"], out=out, seed=7, steps=2, crf=0, **SMALL), models)
    finally:
        torch.set_num_threads(threads)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    try:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "infinitetalk" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
    except psutil.Error:
        return None
    return None


@pytest.mark.slow
def test_torchrun_two_ranks_killed_rank_fails_cleanly_and_the_rerun_resumes_to_the_single_process_video(
        tiny_models, media, reference, tmp_path):
    out, job = tmp_path / "killed.mp4", tmp_path / "job"
    launcher = subprocess.Popen(_torchrun_command(tiny_models, media, out, job_dir=job), env=_env(),
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, killed = time.monotonic() + RUN_TIMEOUT_S, None
        while time.monotonic() < deadline and launcher.poll() is None:
            state = job / "state.json"
            if state.is_file() and json.loads(state.read_text())["windows_done"] >= 1:
                killed = _rank_pid(launcher, 1)
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.05)
        assert killed is not None, "the job ended before rank 1 could be killed mid-job"
        t_kill = time.monotonic()
        _, stderr = launcher.communicate(timeout=RUN_TIMEOUT_S)
        failed_after = time.monotonic() - t_kill
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert failed_after < 60, f"rank 0 took {failed_after:.0f} s to notice the dead rank"
    assert "rerun the same command to resume" in stderr, stderr[-3000:]
    assert not out.exists() and not partial_path(out).exists()    # nothing under the output name
    done = json.loads((job / "state.json").read_text())["windows_done"]
    assert 1 <= done < reference.windows
    first_segment = (job / "segment_0000.mp4").stat()

    rerun = subprocess.run(_torchrun_command(tiny_models, media, out, job_dir=job), env=_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("killed.mp4") == 1 and "rank 1" not in rerun.stderr   # rank 0 alone reports
    assert (job / "segment_0000.mp4").stat().st_mtime_ns == first_segment.st_mtime_ns   # resumed, not redone
    _assert_same_video(out, reference.path)


# -- the ComfyUI worker pool ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_worker_pool_survives_a_dead_worker_restarts_resumes_and_is_kept_between_jobs(tiny_models, models, media,
                                                                                      tmp_path):
    from infinitetalk.pipeline.models import load_models
    from infinitetalk.multigpu.workers import FRONT_COMPONENTS, WorkerPool

    def request(name: str, **kw) -> GenerationRequest:
        return GenerationRequest(left_audio=media["left"], right_audio=media["right"], image=media["image"],
                                 out=tmp_path / name, seed=5, steps=2, crf=0, **SMALL, **kw)

    single = generate(request("single.mp4"), models)
    front = load_models(tiny_models, preset="quality", device="cpu", dtype="fp32",
                        components=FRONT_COMPONENTS)
    assert front.dit is None
    pool = WorkerPool(2, dict(models_dir=str(tiny_models), preset="quality", dtype="fp32"), device_type="cpu")
    try:
        # a worker killed in window 1 fails the job at once, clearly; nothing appears under the output name
        job, seen = tmp_path / "job_c", []

        def kill_in_window_1(done: int, total: int, info) -> None:
            if info.stage == "steps" and info.window == 1 and pool.alive:   # worker 0 reported window 1's first step
                seen.append((pool.starts, time.monotonic()))
                os.kill(pool.pids()[1], signal.SIGKILL)

        with pytest.raises(WorkerLost, match=r"worker 1 \(cpu\) died"):
            generate(request("pool_c.mp4", job_dir=job), front, progress=kill_in_window_1, sampler=pool)
        assert len(seen) == 1 and seen[0][0] == 1
        assert time.monotonic() - seen[0][1] < 30                # noticed at once, not after a timeout
        assert not (tmp_path / "pool_c.mp4").exists() and not partial_path(tmp_path / "pool_c.mp4").exists()
        assert not pool.alive
        # the next job restarts the workers and resumes after the finished window
        third = generate(request("pool_c.mp4", job_dir=job), front, sampler=pool)
        assert pool.starts == 2 and third.resumed_windows == 1
        _assert_same_video(third.path, single.path)
        pids = pool.pids()

        # Cancel stops the workers at the same step (the first step a worker reports); the pool stays usable
        stages = []
        with pytest.raises(JobCancelled):
            generate(request("pool_d.mp4"), front, cancel=lambda: "steps" in stages,
                     progress=lambda d, t, info: stages.append(info.stage), sampler=pool)
        assert stages.count("steps") == 1
        assert pool.alive and pool.starts == 2 and pool.pids() == pids   # the same workers, kept between jobs

        # workers whose VRAM budget cannot hold the window refuse it together, naming `vram`; they stay up
        pool.close()
        pool.load_kwargs["runtime"] = RuntimeOptions(vram_gb=0.01)
        with pytest.raises(InputError) as err:
            generate(request("pool_e.mp4"), front, sampler=pool)
        assert err.value.input_name == "vram" and "fits: NO" in str(err.value)
        assert pool.alive and pool.starts == 3
    finally:
        pool.close()
    assert not pool.alive


def test_loader_gpus_gives_a_bundle_without_dit_whose_sampler_is_a_lazy_worker_pool(custom_node_package,
                                                                                    tiny_models):
    from infinitetalk_multi_pkg.nodes import model_nodes

    from infinitetalk.pipeline.model_files import resolve_model_paths
    from infinitetalk.ops.options import RuntimeOptions
    from infinitetalk.multigpu.workers import WorkerPool

    paths = resolve_model_paths(tiny_models)
    overrides = {"dit": paths.dit, "patch": paths.patch, "wav2vec2": paths.wav2vec2,
                 "text_encoder": paths.text_encoder, "clip_vision": paths.clip_vision, "vae": paths.vae, "loras": []}
    choice = model_nodes.ModelChoice(overrides=overrides, dtype="fp32", offload=False, has_lora=False,
                                     runtime=RuntimeOptions(attention="math"), gpus=2)
    bundle = choice.load("quality")
    assert bundle.dit is None and bundle.vae is not None and choice.load("quality") is bundle
    pool = choice.sampler
    assert isinstance(pool, WorkerPool) and pool.size == 2 and pool.device_type == "cpu"
    assert pool.processes == []                                  # started by the first window, then kept
    assert pool.load_kwargs["overrides"] == overrides and pool.load_kwargs["runtime"].attention == "math"
