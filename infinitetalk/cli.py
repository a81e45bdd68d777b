"""Command line: `infinitetalk {generate,plan,demo,make-tiny-models} ...` (or `python -m infinitetalk ...`)."""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from .dependencies import missing_message

PRESET_NAMES = ("quality", "fast", "turbo")   # pipeline.request.PRESETS, without importing torch for --help
DIT_KINDS = ("auto", "base", "distilled")     # checkpoints.detect.DIT_KINDS, likewise


class _Parser(argparse.ArgumentParser):
    """Refuses a bad command line with one `error: field: ...` line, like every other refusal (no usage block)."""

    def error(self, message: str):
        match = re.match(r"argument (?:--)?([\w-]+)(?:/[^:]*)?: (.*)", message, re.S)
        if match:
            message = f"{match.group(1).replace('-', '_')}: {match.group(2)}"
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _make_tiny_models(args: argparse.Namespace) -> int:
    from .errors import InputError, require_writable_folder
    from .tiny import make_tiny_models

    try:
        require_writable_folder(args.dir, "dir")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = make_tiny_models(Path(args.dir), seed=args.seed)
    for f in files:
        print(f)
    return 0


class ProgressBar:
    """A one-line progress bar on stderr over every stage of a job (pipeline/progress.py), no dependency.

    The ETA is honest: each stage's time per unit is measured as it runs and multiplied by the units left
    of it; while a stage that still has work (say, the first VAE decode) has not been timed yet, the ETA is
    shown as a lower bound (`eta >40s`). Called as (done, total) or (done, total, ProgressInfo).
    """

    def __init__(self, label: str = "generating", stream=None, width: int = 30):
        from .pipeline.progress import StageClock

        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.t0 = self.last_t = time.perf_counter()
        self.first: tuple[int, float] | None = None      # plain calls: (done, time) of the first one
        self.clock = StageClock()
        self.announced = False

    def __call__(self, done: int, total: int, info=None) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
        if info is not None and not self.announced:
            self.announced = True
            if info.resumed_windows:
                self.stream.write(f"resuming: {info.resumed_windows} of {info.windows} windows were already "
                                  "finished in the job folder\n")
        if info is not None:
            self.clock.tick(done, info)
        self.last_t = now
        frac = done / total if total else 1.0
        fill = int(self.width * frac)
        where = ""
        if info is not None:
            stage = {"start": "starting", "write": "writing"}.get(info.stage, info.stage)
            where = f" window {min(info.window + 1, info.windows)}/{info.windows} {stage:8s}"
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {100 * frac:3.0f}%{where} "
                          f"{now - self.t0:5.0f}s{self._eta(done, total, info)}{end}")
        self.stream.flush()

    def _eta(self, done: int, total: int, info) -> str:
        if done >= total:
            return ""
        if info is None:   # plain (done, total): one rate over everything since the first call
            d0, t0 = self.first
            return f" eta {(self.last_t - t0) / (done - d0) * (total - done):.0f}s" if done > d0 else ""
        eta = self.clock.eta(info)
        if eta is None:
            return " eta ?"
        return f" eta {'>' if eta[1] else ''}{eta[0]:.0f}s"


def _request_from_args(args: argparse.Namespace):
    from .pipeline.request import GenerationRequest
    from .text.prompts import DEFAULT_PROMPT

    return GenerationRequest(
        left_audio=Path(args.left_audio) if args.left_audio else None,
        right_audio=Path(args.right_audio) if args.right_audio else None, out=Path(args.out),
        stereo_audio=Path(args.stereo_audio) if args.stereo_audio else None,
        image=Path(args.image) if args.image else None, video=Path(args.video) if args.video else None,
        mask_image=Path(args.mask) if args.mask else None,
        left_mask=Path(args.left_mask) if args.left_mask else None,
        right_mask=Path(args.right_mask) if args.right_mask else None,
        prompt="\n".join(args.prompt or [DEFAULT_PROMPT]), negative_prompt=args.negative_prompt, order=args.order,
        resolution=args.resolution,
        seed=args.seed, preset=args.preset, steps=args.steps, text_guidance=args.text_guidance,
        audio_guidance=args.audio_guidance, shift=args.shift, color_strength=args.color_strength, crf=args.crf,
        job_dir=Path(args.job_dir) if args.job_dir else None, size_scale=args.size_scale, keep_job=args.keep_job,
        frame_num=args.frame_num, motion_frames=args.motion_frames, teacache=args.teacache, denoise=args.denoise,
    )


def _generate(args: argparse.Namespace) -> int:
    from .errors import CheckpointError, InputError, JobCancelled, WorkerLost
    from .pipeline.generate import generate
    from .pipeline.inputs import prepare_inputs
    from .pipeline.models import load_models
    from .multigpu.launch import LeaderSampler, join_as_leader, launch_env, run_follower

    world = inputs = None
    try:
        runtime = _runtime_from_args(args)
        if not args.quiet:   # the memory plan every job logs at its start (runtime/plan.py)
            _log_to_stderr("infinitetalk.runtime")
        overrides = {"dit": args.dit, "patch": args.patch, "wav2vec2": args.wav2vec2,
                     "text_encoder": args.text_encoder, "clip_vision": args.clip_vision, "vae": args.vae,
                     "tokenizer": args.tokenizer, "lora_strength": args.lora_strength, "dit_kind": args.dit_kind,
                     "loras": [(p, args.lora_strength) for p in args.lora or []]}
        env = launch_env()                          # torchrun: rank 0 does all I/O, the others hold only the DiT
        if env is not None and not env.is_main:
            return run_follower(lambda device: load_models(args.models, preset=args.preset, device=device,
                                                           dtype=args.dtype, overrides=overrides,
                                                           components=("dit",), runtime=runtime), args.device)
        world = join_as_leader(args.device) if env is not None else None
        request = _request_from_args(args)
        inputs = prepare_inputs(request.resolved())   # checked once: bad inputs fail before gigabytes of weights load
        _warn_full_size_on_cpu(args)
        t0 = time.perf_counter()
        models = load_models(args.models, preset=args.preset, device=world.device if world else args.device,
                             dtype=args.dtype, overrides=overrides, runtime=runtime)
        print(f"models loaded in {time.perf_counter() - t0:.1f}s on {models.device} ({models.dtype})", file=sys.stderr)
        for lora, strength in getattr(models.paths, "loras", None) or []:
            print(f"LoRA: {Path(lora).name} (strength {strength:g})", file=sys.stderr)
        result = generate(request, models, progress=None if args.quiet else ProgressBar(), inputs=inputs,
                          sampler=LeaderSampler(world, models) if world else None)
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerLost as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except JobCancelled as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nstopped; rerun the same command to resume after the last finished window", file=sys.stderr)
        return 130
    except Exception as exc:   # noqa: BLE001 - under torchrun: one line, not a traceback page per rank
        if world is None:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if inputs is not None:
            inputs.source.close()
        if world is not None:
            world.close()
    print(f"{result.path}  {result.frames} frames ({result.seconds:.2f} s) {result.width}x{result.height} "
          f"seed {result.seed}  in {result.elapsed_s:.1f}s")
    return 0


def _warn_full_size_on_cpu(args: argparse.Namespace) -> None:
    """A full-size job on a CPU takes hours per window: say so before loading, with the way out."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cpu") and args.size_scale >= 1.0:
        print(f"warning: generating at full {args.resolution} size on a CPU takes hours per 81-frame window; "
              "for a preview add --size-scale 0.125 (or use a CUDA GPU)", file=sys.stderr)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .errors import InputError, require_writable_folder

    try:
        require_writable_folder(Path(args.out).resolve().parent, "out")
        result = run_demo(Path(args.out), cache_dir=Path(args.cache) if args.cache else None, seconds=args.seconds,
                          progress=None if args.quiet else ProgressBar("demo"), steps=args.steps,
                          size_scale=args.size_scale, frame_num=args.frame_num, motion_frames=args.motion_frames)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.path}  {result.frames} frames ({result.seconds:.2f} s) {result.width}x{result.height} "
          f"seed {result.seed}  in {result.elapsed_s:.1f}s")
    return 0


def _add_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frame-num", type=int, default=81, help="frames per window, 4n+1 (the model is trained on 81)")
    p.add_argument("--motion-frames", type=int, default=9, help="frames carried into the next window, 4n+1")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="make a two-person talking video from an image or video and two audio files",
                       description="Make a two-person lip-synced video. Model files are found by content in --models "
                                   "(a ComfyUI-style models folder); any component can be given explicitly instead.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="picture showing both people (left and right)")
    src.add_argument("--video", help="video showing both people (read at 25 fps; dubbing)")
    p.add_argument("--left-audio", help="what the person on the left says")
    p.add_argument("--right-audio", help="what the person on the right says")
    p.add_argument("--stereo-audio", help="instead of --left/right-audio: one stereo conversation file, left channel "
                                          "= the person on the left, right channel = the person on the right")
    p.add_argument("--out", required=True, help="output .mp4 (appears only when complete)")
    p.add_argument("--models", help="ComfyUI-style models folder (diffusion_models/, loras/, vae/, ...)")
    p.add_argument("--mask", help="mask image: white = may move (both speakers); the rest is kept from the source")
    p.add_argument("--left-mask", help="region of the left speaker (white); needs --right-mask")
    p.add_argument("--right-mask", help="region of the right speaker (white); needs --left-mask")
    p.add_argument("--prompt", action="append", default=None,
                   help="what the scene looks like (repeatable, or one per line: successive windows take successive "
                        "prompts, the first 81 frames (3.2 s), then 72 new frames (2.9 s) each, the last prompt "
                        "repeating); default: two people talking")
    p.add_argument("--negative-prompt", default=None, help="default: the reference's negative prompt")
    p.add_argument("--order", choices=("meanwhile", "left_right", "right_left"), default=None,
                   help="who speaks when (default: left_right for an image, meanwhile for a video)")
    p.add_argument("--resolution", choices=("480p", "720p"), default="480p")
    p.add_argument("--seed", type=int, default=-1, help="-1 = random (the seed used is printed and stored in the file)")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quality",
                   help="quality: 40 steps, 3 model calls/step; fast: distill LoRA, 6 steps, 2 calls/step; turbo: "
                        "the 4-step distilled DiT (else the base DiT + lightx2v LoRA), 4 steps, 1 call/step")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--text-guidance", "--text-scale", type=float, default=None,
                   help="text CFG strength (default: the preset's, 5 quality / 1 fast, turbo); --text-scale is the "
                        "old name")
    p.add_argument("--audio-guidance", "--audio-scale", type=float, default=None,
                   help="audio (lip-sync) CFG strength (default: the preset's, 4 quality / 2 fast / 1 turbo); "
                        "--audio-scale is the old name")
    p.add_argument("--shift", type=float, default=None,
                   help="default 7 at 480p, 11 at 720p (turbo: 11 at 480p, 7 at 720p, as LightX2V's distilled configs)")
    p.add_argument("--teacache", type=float, default=0.0,
                   help="TeaCache step-skipping threshold for the quality preset (0 = off; 0.1 ≈ 2×, 0.2 ≈ 3× faster, "
                        "approximate)")
    p.add_argument("--denoise", type=float, default=1.0,
                   help="--video only: how much of each window is made anew (1 = from pure noise, the reference; "
                        "lower starts from the source frames noised to that level and keeps more of their motion)")
    p.add_argument("--color-strength", type=float, default=1.0, help="colour match to the first frame, 0..1")
    p.add_argument("--size-scale", type=float, default=1.0, help="shrink the output size (previews); 1 = full")
    p.add_argument("--crf", type=int, default=19, help="h264 quality (lower = better, bigger)")
    _add_window_args(p)
    p.add_argument("--job-dir", default=None, help="resume folder (default: hidden folder beside --out)")
    p.add_argument("--keep-job", action="store_true", help="keep the job folder after success")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    for name, what in (("dit", "Wan2.1-I2V DiT (with or without the InfiniteTalk weights)"),
                       ("patch", "InfiniteTalk audio adapter"), ("wav2vec2", "audio encoder"),
                       ("text-encoder", "umT5-XXL text encoder"), ("tokenizer", "umT5 spiece.model"),
                       ("clip-vision", "CLIP ViT-H vision encoder"), ("vae", "Wan2.1 VAE")):
        p.add_argument(f"--{name}", default=None, help=f"{what} file (overrides the models folder)")
    _add_dit_kind(p)
    p.add_argument("--lora", action="append", help="LoRA file (repeatable); the fast preset needs a distill LoRA")
    p.add_argument("--lora-strength", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_runtime_args(p)
    p.set_defaults(func=_generate)


def _add_dit_kind(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dit-kind", choices=DIT_KINDS, default="auto",
                   help="whether the DiT file is the step-distilled one (turbo) or the base Wan2.1 DiT; their tensors "
                        "look alike, so auto goes by the file's metadata or name (4StepDistill / StepDistill)")


def _add_runtime_args(p: argparse.ArgumentParser, kernels: bool = True) -> None:
    """The RuntimeOptions flags (docs/runtime.md): budget, kernels, guidance batching."""
    from .ops.options import ATTENTION_CHOICES, FP8_MATMUL_CHOICES, FUSE_CHOICES

    p.add_argument("--vram", type=float, default=None, metavar="GB",
                   help="GPU memory the job may use; DiT blocks that do not fit stream from host memory "
                        "(default / 0: free memory of the device minus a margin)")
    p.add_argument("--fp8-matmul", choices=FP8_MATMUL_CHOICES, default="off",
                   help="fp8 weights through fp8 matmuls: faster, slightly less exact (auto: on GPUs that have "
                        "them; default off); plan counts their workspace instead of a dequantised weight")
    if kernels:
        p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                       help="attention kernel (auto: the fastest exact one of the device)")
        p.add_argument("--fp8-fast-accum", action="store_true",
                       help="with --fp8-matmul: the fp8 matmul's fast accumulation (Hopper; faster, less exact)")
        p.add_argument("--fuse", choices=FUSE_CHOICES, default="auto",
                       help="the transformer's float32 steps (norms, modulation, RoPE) as compiled kernels (auto: on "
                            "a CUDA GPU with Triton unless --compile compiles whole blocks)")
        p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--no-batch-guidance", action="store_true",
                   help="run a step's guidance calls one by one even when a batch would fit")


def _log_to_stderr(name: str) -> None:
    import logging

    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _runtime_from_args(args: argparse.Namespace):
    from .ops.options import RuntimeOptions

    return RuntimeOptions(vram_gb=args.vram, attention=getattr(args, "attention", "auto"),
                          fp8_matmul=getattr(args, "fp8_matmul", "off"), compile=getattr(args, "compile", False),
                          fp8_fast_accum=getattr(args, "fp8_fast_accum", False), fuse=getattr(args, "fuse", "auto"),
                          batch_guidance=not args.no_batch_guidance)


def _plan(args: argparse.Namespace) -> int:
    import json

    import torch

    from .errors import CheckpointError, InputError
    from .pipeline.models import plan_from_files

    try:
        runtime = _runtime_from_args(args)
        plan = plan_from_files(args.models, preset=args.preset, resolution=args.resolution, vram_gb=runtime.vram_gb,
                               overrides={"loras": [(p, 1.0) for p in args.lora or []], "dit_kind": args.dit_kind},
                               frame_num=args.frame_num, batch_guidance=runtime.batch_guidance,
                               fp8_matmul=runtime.fp8_matmul != "off")
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.json:
        print("note: no CUDA GPU on this machine: this is the plan for one with the memory given by --vram "
              "(none given: unlimited)", file=sys.stderr)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.text())
    return 0 if plan.fits else 1


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="print the memory plan of a job from the model files' headers (no weights loaded)",
                       description="Per component: bytes by dtype and where it lives; the predicted peak GPU memory "
                                   "of a DiT step and of a VAE decode; whether the job fits. Exit status 1 when not.")
    p.add_argument("--models", required=True, help="ComfyUI-style models folder")
    p.add_argument("--preset", choices=PRESET_NAMES, default="quality")
    p.add_argument("--resolution", choices=("480p", "720p"), default="480p")
    p.add_argument("--frame-num", type=int, default=81, help="frames per window")
    p.add_argument("--lora", action="append", help="LoRA file (repeatable)")
    _add_dit_kind(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_runtime_args(p, kernels=False)
    p.set_defaults(func=_plan)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="infinitetalk", description="InfiniteTalk Multi: two-person lip-synced video.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_plan(sub)
    d = sub.add_parser("demo", help="end-to-end run on tiny random models with a synthetic picture and voices (CPU, seconds)")
    d.add_argument("--out", default="demo.mp4", help="output .mp4 (default: demo.mp4)")
    d.add_argument("--cache", default=None, help="folder for the tiny models (default: a temporary folder)")
    d.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic conversation (default: 4)")
    d.add_argument("--steps", type=int, default=2, help="denoising steps per window (default: 2)")
    d.add_argument("--size-scale", type=float, default=0.125, help="fraction of the 480p bucket size (default: 0.125)")
    _add_window_args(d)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    p = sub.add_parser("make-tiny-models", help="write random tiny checkpoints (every real layout) into a ComfyUI-style models folder")
    p.add_argument("dir", help="models folder to create/fill (diffusion_models/, model_patches/, loras/, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "demo") and (missing := missing_message()):
        print(f"error: {missing}", file=sys.stderr)   # the one sentence, not a ModuleNotFoundError mid-job
        return 2
    return int(args.func(args) or 0)
