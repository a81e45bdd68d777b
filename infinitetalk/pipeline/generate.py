"""The long-video job: one request in, one finished mp4 out (reference `generate_infinitetalk`, §5).

Reads top to bottom like the method:
1. check every input before any model work (audio, picture, masks, length, output) -> InputError;
2. open the job folder (resume after the last finished window, same seed);
3. audio features per speaker (loudness −23 LUFS, wav2vec2 at 25 fps), prompt embeddings (a prompt per
   line applies to successive windows, the last line repeating);
4. per window of 81 frames (72 new + 9 motion frames from the previous window):
   reference frame -> CLIP + y; motion latents; audio window; guided Euler sampling from a per-window
   seeded noise; decode frame by frame, colour-match to the first reference, stream into the window's
   segment; keep the last 9 frames for the next window; commit;
5. join the segments with the placed audio mix into the final file (atomic rename), drop the job folder.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..audio.loudness import normalize_loudness
from ..errors import InputError, JobCancelled
from ..models.wav2vec2 import normalize_waveform
from ..runtime.budget import JobShape
from ..text.prompts import DEFAULT_NEGATIVE_PROMPT, prompt_for_window, window_prompts
from ..video.segments import concat_segments
from ..video.writer import Mp4Writer
from .color import match_and_blend_colors
from .conditioning import motion_latents, reference_condition, to_model_frames, to_uint8_frames
from .inputs import PreparedInputs, prepare_inputs
from .job import JobFolder, JobState, default_job_dir, fingerprint
from .progress import JobProgress, ProgressHook, ProgressInfo
from .request import GenerationRequest
from .sampler import Guidance, KeepRegion, WindowConditioning, WindowSampler, sample_window, window_noise
from .schedule import timesteps
from .teacache import TeaCache
from .windows import gather_audio_windows

if TYPE_CHECKING:
    from .models import ModelBundle

__all__ = ["generate", "GenerationResult", "ProgressHook", "ProgressInfo", "CancelHook", "WindowHook"]

# ProgressHook (progress.py): (done, total[, ProgressInfo]) over every stage of every window
CancelHook = Callable[[], bool]                     # True: stop at the next step boundary
WindowHook = Callable[[int, torch.Tensor], None]    # (window index, uint8 frames [n, H, W, 3])


@dataclass
class GenerationResult:
    path: Path
    frames: int
    seconds: float
    seed: int
    width: int
    height: int
    windows: int
    resumed_windows: int = 0
    elapsed_s: float = 0.0
    settings: dict = field(default_factory=dict)
    audio: tuple | None = None  # the muxed mix before AAC: (samples [C, T] float32, sample rate)


def generate(request: GenerationRequest, models: ModelBundle, progress: ProgressHook | None = None,
             cancel: CancelHook | None = None, on_window: WindowHook | None = None, *,
             inputs: PreparedInputs | None = None, sampler: WindowSampler | None = None) -> GenerationResult:
    """Run one job to a finished mp4 at `request.out` (see module docstring).

    `inputs`: `prepare_inputs(request.resolved())` when the caller already checked them (the CLI does, before
    loading the models; the caller closes them). `sampler`: a multi-process `WindowSampler` in place of
    `sample_window`.
    Raises InputError (bad input, nothing written), JobCancelled (the job folder keeps finished windows;
    rerun the same request to resume). Nothing appears under the output name unless the job completed.
    """

    t_start = time.perf_counter()
    req = request.resolved()
    prepared = inputs if inputs is not None else prepare_inputs(req)   # every InputError happens here
    try:
        _check_sampler(sampler, req)                       # InputError("teacache") when the sampler lacks it
        _place_for_job(models, req, prepared, sampler)     # InputError("vram") when the job cannot fit
        return _generate(request, req, prepared, models, sampler, progress, cancel, on_window, t_start)
    finally:
        if inputs is None:   # opened here, closed here
            prepared.source.close()


def _generate(request, req, inputs, models, sampler, progress, cancel, on_window, t_start) -> GenerationResult:
    plan, (height, width) = inputs.plan, inputs.size

    # -- job folder: resume or start -------------------------------------------------------------
    job = JobFolder(Path(req.job_dir) if req.job_dir else default_job_dir(req.out))
    job_id = fingerprint(request, models.identity())
    state = job.load(job_id)
    resumed = state.windows_done if state else 0
    if resumed:   # operators of a fleet see that a taken-over job did not start over

        logging.getLogger("infinitetalk").info("resuming job %s from its job folder: %d of %d windows already done",
                                               job_id[:12], resumed, plan.num_chunks)
    if state is None:
        state = JobState(fingerprint=job_id, seed=req.seed, windows_total=plan.num_chunks,
                         info={"frames": plan.final_frames, "size": [height, width]})
        job.start(state)
    seed = state.seed
    settings = _settings(req, seed, height, width, plan.final_frames)
    recipe = models.recipe() if hasattr(models, "recipe") else {}
    if recipe:   # which DiT and LoRAs made it: turbo says whether the distilled DiT or the distill LoRA ran
        settings["model"] = recipe

    steps = int(req.steps)
    times = timesteps(steps, float(req.shift))   # resolved: the request's, else the preset's at its resolution
    guidance = Guidance(float(req.text_guidance), float(req.audio_guidance))
    tracker = JobProgress(progress, plan.num_chunks, steps, (plan.frame_num - 1) // 4 + 1, resumed)

    def on_step(_: int) -> None:
        tracker.advance("steps")
        if cancel is not None and cancel():
            raise JobCancelled("cancelled; finished windows are kept in the job folder for resume")

    if cancel is not None and cancel():
        raise JobCancelled("cancelled before the first window")
    tracker.start()

    if state.windows_done < plan.num_chunks:
        _run_windows(req, models, sampler, inputs, job, state, times, guidance, on_step, on_window, tracker)

    # -- finish: one file, atomic ------------------------------------------------------------------

    out = Path(req.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    concat_segments(job.segments(plan.num_chunks), out, frames=plan.final_frames, audio=inputs.mix,
                    metadata={"comment": json.dumps(settings, sort_keys=True)})
    if not req.keep_job:
        job.remove()
    tracker.finish()
    return GenerationResult(path=out, frames=plan.final_frames, seconds=plan.final_frames / 25.0, seed=seed,
                            width=width, height=height, windows=plan.num_chunks, resumed_windows=resumed,
                            elapsed_s=time.perf_counter() - t_start, settings=settings, audio=inputs.mix)


def _settings(req: GenerationRequest, seed: int, height: int, width: int, frames: int) -> dict:
    """What the output's metadata records (enough to reproduce the video)."""
    return {
        "generator": "infinitetalk-multi", "seed": seed, "preset": req.preset, "steps": req.steps,
        "text_guidance": req.text_guidance, "audio_guidance": req.audio_guidance,
        "shift": req.shift,
        "resolution": req.resolution, "size": [height, width], "order": req.order, "frames": frames,
        "prompt": req.prompt, "prompts": window_prompts(req.prompt), "color_strength": req.color_strength,
        **({"teacache": {"threshold": req.teacache, "scale": req.resolution.removesuffix("p"),
                         "retention_steps": False}} if req.teacache else {}),
        **({"denoise": req.denoise} if req.denoise < 1.0 else {}),
    }


@torch.no_grad()
def _run_windows(req, models, sampler, inputs, job: JobFolder, state: JobState, times, guidance, on_step,
                 on_window, tracker: JobProgress) -> None:

    plan, (height, width) = inputs.plan, inputs.size
    device, dtype = models.device, models.dtype
    frame_num, n_motion_frames = plan.frame_num, plan.motion_frames

    features = _speaker_features(models, inputs)            # [N, L, C] per speaker, CPU float32
    contexts, context_null = _prompt_embeddings(models, req)   # per window prompt (host memory), negative
    _release_host_memory()   # the audio encoder's scratch grows with the audio length: give it back
    tracker.advance("prepare")
    speaker_masks = inputs.latent_speaker_masks.to(device)  # [3, h, w]
    first_reference = to_model_frames(inputs.source.frame(0)).to(device)   # colour target of every window

    sample = sampler or sample_window   # multi-process runs: every rank samples the window together
    placement = getattr(models, "placement", None)   # guidance calls per DiT pass that fit the budget
    extra = {} if sampler or placement is None else {"batch": placement.max_guidance_batch}
    cached: dict = {}  # image input: the reference conditioning is the same for every window
    tail = job.load_tail(state.windows_done - 1).to(device) if state.windows_done else None

    for k in range(state.windows_done, plan.num_chunks):
        start, _ = plan.windows[k]
        ref_y, ref_latent, clip_fea = _reference(models, inputs, start, frame_num, cached)
        motion = ref_latent if k == 0 else motion_latents(models.vae, tail)
        audio = gather_audio_windows(features, start, frame_num).to(device, dtype)
        context = prompt_for_window(contexts, k).to(device, dtype)
        cond = WindowConditioning(context=context, context_null=context_null, clip_fea=clip_fea,
                                  y=ref_y.to(dtype), audio=audio, ref_target_masks=speaker_masks)
        noise = window_noise(state.seed, k, (ref_latent.shape[0], *ref_y.shape[1:]), device)
        keep, keep_frames = _keep_region(models, inputs, start, frame_num, cached)
        tracker.advance("encode")

        window_times = times
        if req.denoise < 1.0:   # video-to-video at a strength: start from the source, noised, part way down
            noise, window_times = _from_source(models, inputs, start, frame_num, noise, times, req.denoise)
        if req.teacache:   # step skipping (quality recipe; settings["teacache"] records it): fresh state per window
            extra["teacache"] = TeaCache(req.teacache, scale=req.resolution.removesuffix("p"))
        latent = sample(models.dit, noise, cond, window_times, guidance, motion, keep=keep, on_step=on_step, **extra)

        # decode frame by frame, colour-match, stream the kept frames into this window's segment
        lo, hi = plan.kept_range(k)
        tail_parts, preview, index = [], [], 0
        with Mp4Writer(job.segment(k), width, height, fps=25, crf=req.crf) as writer:
            for chunk in models.vae.decode_stream(latent, tile=models.vae_tile):
                chunk = match_and_blend_colors(chunk[None], first_reference[None, :, None], req.color_strength)[0]
                n = chunk.shape[1]
                if keep_frames is not None:   # pixels outside the mask: exactly the source
                    weight = inputs.pixel_keep_weight[0].to(chunk.device)
                    src = to_model_frames(keep_frames[index:index + n]).to(chunk.device)
                    chunk = weight[:, None] * chunk + (1.0 - weight[:, None]) * src
                a, b = max(lo, index), min(hi, index + n)
                if a < b:
                    frames = to_uint8_frames(chunk[:, a - index:b - index]).cpu()
                    writer.write(frames)
                    if on_window is not None:
                        preview.append(frames)
                if index + n > frame_num - n_motion_frames:
                    tail_parts.append(chunk[:, max(0, frame_num - n_motion_frames - index):].clone())
                index += n
                tracker.advance("decode")
        tail = torch.cat(tail_parts, dim=1)
        job.save_tail(k, tail)
        state.windows_done = k + 1
        state.frames_done = hi if k == 0 else start + hi
        job.commit(state)
        tracker.window_done(k)
        if on_window is not None and preview:
            on_window(k, torch.cat(preview))


def _check_sampler(sampler: WindowSampler | None, req) -> None:
    """Refuse, before any model work, a setting the multi-process sampler has not declared it can run."""

    if req.teacache and sampler is not None and not sampler.step_skipping:
        raise InputError("teacache", f"step skipping ({req.teacache:g}) is not available with multi-process "
                                     "sampling yet; use teacache 0 or one process")


def _place_for_job(models, req, inputs, sampler: WindowSampler | None = None) -> None:
    """Decide where the DiT's blocks live for this job's size (runtime/plan.py), log the plan, and refuse a
    job that cannot fit the VRAM budget with the plan in the error, before any model work. With a
    multi-process `sampler` this process plans for its share of each window (its calls, its token shard)."""
    if getattr(models, "dit", None) is None or not hasattr(models, "prepare"):
        return   # a bundle without the DiT (its workers plan their own memory)
    calls = Guidance(float(req.text_guidance), float(req.audio_guidance)).calls_per_step
    height, width = inputs.size
    job = JobShape.for_window(height, width, inputs.plan.frame_num, calls, teacache=bool(req.teacache))
    if sampler is not None:
        job = sampler.job_share(job, getattr(getattr(models.dit, "config", None), "num_heads", None))
    plan = models.prepare(job)
    logging.getLogger("infinitetalk.runtime").info("%s", plan.text())
    if not plan.fits:
        raise InputError("vram", f"this job does not fit the VRAM budget:\n{plan.text()}")


def _release_host_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, so transient peaks would stack)."""

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def _speaker_features(models, inputs) -> list[torch.Tensor]:
    """wav2vec2 features `[N, L, C]` of each speaker's placed, loudness-normalised 16 kHz track."""

    out = []
    with models.using("wav2vec2") as w2v:
        for track in inputs.speaker_tracks:
            x = normalize_loudness(np.asarray(track, dtype=np.float32), 16000, target=-23.0)
            wave = torch.as_tensor(np.asarray(x, dtype=np.float32))
            if w2v.normalize_input:  # the checkpoint's `do_normalize` (off for chinese-wav2vec2-base)
                wave = normalize_waveform(wave)
            device = next(w2v.parameters()).device
            feats = w2v(wave.to(device, torch.float32), inputs.plan.audio_frames)
            out.append(feats.float().cpu())
    return out


def _prompt_embeddings(models, req) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each window's prompt embedding (one per line of the prompt, the last repeating; each distinct prompt
    encoded once, kept in host memory until its window) and the negative prompt's, on the compute device."""

    negative = req.negative_prompt if req.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    prompts = window_prompts(req.prompt)
    with models.using("text_encoder") as t5:
        encoded = {p: t5.encode(p).cpu() for p in dict.fromkeys(prompts)}
        context_null = t5.encode(negative)
    return [encoded[p] for p in prompts], context_null.to(models.device, models.dtype)


def _reference(models, inputs, start: int, frame_num: int, cached: dict):
    """(y, clean reference latent, CLIP features) of the window starting at `start`."""
    if "reference" in cached:
        return cached["reference"]
    ref = to_model_frames(inputs.source.frame(start)).to(models.device)
    with models.using("clip_vision") as clip:
        clip_fea = clip(ref.to(clip.dtype))[None].to(models.dtype)
    y, ref_latent = reference_condition(models.vae, ref, frame_num)
    result = (y, ref_latent, clip_fea)
    if inputs.source.is_still:
        cached["reference"] = result
    return result


def _from_source(models, inputs, start: int, frame_num: int, noise: torch.Tensor, times: torch.Tensor,
                 strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(start latent, times) of a window denoised at `strength` < 1: the first model time at or below
    strength x 1000 and the window's source latents noised to it, x = (1 - sigma) x0 + sigma noise (flow matching)."""
    first = next((i for i in range(times.numel() - 1) if float(times[i]) <= strength * 1000.0), times.numel() - 2)
    source = models.vae.encode(to_model_frames(inputs.source.frames(start, frame_num)).to(models.device))
    sigma = float(times[first]) / 1000.0
    return (1.0 - sigma) * source.to(noise.dtype) + sigma * noise, times[first:]


def _keep_region(models, inputs, start: int, frame_num: int, cached: dict):
    """What must not move (only with a mask image): the source latents + latent mask for the sampler, and the
    window's source frames (uint8) for the pixel composite after decoding. (None, None) without a mask."""
    if inputs.latent_keep_mask is None:
        return None, None
    if "keep" in cached:
        return cached["keep"]
    frames = inputs.source.frames(start, frame_num)
    latents = models.vae.encode(to_model_frames(frames).to(models.device))
    result = (KeepRegion(latents=latents, mask=inputs.latent_keep_mask.to(models.device)), frames)
    if inputs.source.is_still:
        cached["keep"] = result
    return result
