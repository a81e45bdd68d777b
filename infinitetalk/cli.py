"""Command line: `python -m infinitetalk {generate,demo,make-tiny-models} ...`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _make_tiny_models(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_models

    files = make_tiny_models(Path(args.dir), seed=args.seed)
    for f in files:
        print(f)
    return 0


class ProgressBar:
    """A one-line text progress bar on stderr over windows × steps (no dependency)."""

    def __init__(self, label: str = "generating", stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.t0 = time.perf_counter()
        self.first = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
        frac = done / total if total else 1.0
        fill = int(self.width * frac)
        d0, t0 = self.first
        eta = ""
        if done > d0:
            eta = f" eta {(now - t0) / (done - d0) * (total - done):5.0f}s"
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} steps "
                          f"{now - self.t0:5.0f}s{eta}{end}")
        self.stream.flush()


def _request_from_args(args: argparse.Namespace):
    from .pipeline.request import GenerationRequest

    return GenerationRequest(
        left_audio=Path(args.left_audio), right_audio=Path(args.right_audio), out=Path(args.out),
        image=Path(args.image) if args.image else None, video=Path(args.video) if args.video else None,
        mask_image=Path(args.mask) if args.mask else None,
        left_mask=Path(args.left_mask) if args.left_mask else None,
        right_mask=Path(args.right_mask) if args.right_mask else None,
        prompt=args.prompt, negative_prompt=args.negative_prompt, order=args.order, resolution=args.resolution,
        seed=args.seed, preset=args.preset, steps=args.steps, text_scale=args.text_scale,
        audio_scale=args.audio_scale, shift=args.shift, color_strength=args.color_strength, crf=args.crf,
        job_dir=Path(args.job_dir) if args.job_dir else None, size_scale=args.size_scale, keep_job=args.keep_job,
        frame_num=args.frame_num, motion_frames=args.motion_frames,
    )


def _generate(args: argparse.Namespace) -> int:
    from .errors import CheckpointError, InputError, JobCancelled
    from .pipeline.generate import generate
    from .pipeline.inputs import prepare_inputs
    from .pipeline.models import load_models

    try:
        request = _request_from_args(args)
        prepare_inputs(request.resolved()).source.close()   # fail on bad inputs before loading gigabytes of weights
        overrides = {"dit": args.dit, "patch": args.patch, "wav2vec2": args.wav2vec2,
                     "text_encoder": args.text_encoder, "clip_vision": args.clip_vision, "vae": args.vae,
                     "tokenizer": args.tokenizer, "lora_strength": args.lora_strength,
                     "loras": [(p, args.lora_strength) for p in args.lora or []]}
        t0 = time.perf_counter()
        models = load_models(args.models, preset=args.preset, device=args.device, dtype=args.dtype,
                             overrides=overrides)
        print(f"models loaded in {time.perf_counter() - t0:.1f}s on {models.device} ({models.dtype})", file=sys.stderr)
        result = generate(request, models, progress=None if args.quiet else ProgressBar())
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobCancelled as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nstopped; rerun the same command to resume after the last finished window", file=sys.stderr)
        return 130
    print(f"{result.path}  {result.frames} frames ({result.seconds:.2f} s) {result.width}x{result.height} "
          f"seed {result.seed}  in {result.elapsed_s:.1f}s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(Path(args.out), cache_dir=Path(args.cache) if args.cache else None, seconds=args.seconds,
                      progress=None if args.quiet else ProgressBar("demo"), steps=args.steps, size_scale=args.size_scale,
                      frame_num=args.frame_num, motion_frames=args.motion_frames)
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
    p.add_argument("--left-audio", required=True, help="what the person on the left says")
    p.add_argument("--right-audio", required=True, help="what the person on the right says")
    p.add_argument("--out", required=True, help="output .mp4 (appears only when complete)")
    p.add_argument("--models", help="ComfyUI-style models folder (diffusion_models/, loras/, vae/, ...)")
    p.add_argument("--mask", help="mask image: white = may move (both speakers); the rest is kept from the source")
    p.add_argument("--left-mask", help="region of the left speaker (white); needs --right-mask")
    p.add_argument("--right-mask", help="region of the right speaker (white); needs --left-mask")
    p.add_argument("--prompt", default="Two people are talking to each other.")
    p.add_argument("--negative-prompt", default=None, help="default: the reference's negative prompt")
    p.add_argument("--order", choices=("meanwhile", "left_right", "right_left"), default=None,
                   help="who speaks when (default: left_right for an image, meanwhile for a video)")
    p.add_argument("--resolution", choices=("480p", "720p"), default="480p")
    p.add_argument("--seed", type=int, default=-1, help="-1 = random (the seed used is printed and stored in the file)")
    p.add_argument("--preset", choices=("quality", "fast"), default="quality",
                   help="quality: 40 steps, 3 model calls/step; fast: distill LoRA, 6 steps, 2 calls/step")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--text-scale", type=float, default=None)
    p.add_argument("--audio-scale", type=float, default=None)
    p.add_argument("--shift", type=float, default=None, help="default 7 at 480p, 11 at 720p")
    p.add_argument("--color-strength", type=float, default=1.0, help="colour match to the first frame, 0..1")
    p.add_argument("--size-scale", type=float, default=1.0, help="shrink the output size (previews); 1 = full")
    p.add_argument("--crf", type=int, default=19, help="h264 quality (lower = better, bigger)")
    _add_window_args(p)
    p.add_argument("--job-dir", default=None, help="resume folder (default: hidden folder beside --out)")
    p.add_argument("--keep-job", action="store_true", help="keep the job folder after success")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    for name, what in (("dit", "Wan2.1-I2V DiT (with or without the InfiniteTalk weights)"),
                       ("patch", "InfiniteTalk audio adapter file"), ("wav2vec2", "audio encoder"),
                       ("text-encoder", "umT5-XXL text encoder"), ("tokenizer", "umT5 spiece.model"),
                       ("clip-vision", "CLIP ViT-H vision encoder"), ("vae", "Wan2.1 VAE")):
        p.add_argument(f"--{name}", default=None, help=f"{what} file (overrides the models folder)")
    p.add_argument("--lora", action="append", help="LoRA file (repeatable); the fast preset needs a distill LoRA")
    p.add_argument("--lora-strength", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m infinitetalk", description="InfiniteTalk Multi: two-person lip-synced video.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    d = sub.add_parser("demo", help="end-to-end run on tiny random models with a synthetic picture and voices (CPU, seconds)")
    d.add_argument("--out", default="demo.mp4")
    d.add_argument("--cache", default=None, help="folder for the tiny models (default: a temporary folder)")
    d.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic conversation")
    d.add_argument("--steps", type=int, default=2)
    d.add_argument("--size-scale", type=float, default=0.125, help="fraction of the 480p bucket size")
    _add_window_args(d)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_demo)
    p = sub.add_parser("make-tiny-models", help="write random tiny checkpoints (every real layout) into a ComfyUI-style models folder")
    p.add_argument("dir", help="models folder to create/fill (diffusion_models/, model_patches/, loras/, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
