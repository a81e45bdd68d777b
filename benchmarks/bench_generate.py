"""End-to-end generation speed: seconds of compute per second of video, for both presets.

Default (GPU): full-size InfiniteTalk/Wan2.1-I2V-14B shapes with random bf16 weights built in memory (no
downloads; random weights cost exactly what real ones do), real-size VAE, CLIP ViT-H and wav2vec2-base; the
umT5 text encoder is replaced by random context rows (it runs once per job). `--tiny`: the tiny random
checkpoints on the CPU (checks the script and the pipeline, numbers are not meaningful).

    python benchmarks/bench_generate.py                      # CUDA, 480p, 10 s of audio, both presets
    python benchmarks/bench_generate.py --resolution 720p --seconds 5
    python benchmarks/bench_generate.py --tiny               # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RandomTextEncoder:
    """Stands in for umT5-XXL: random [L, 4096] rows (text encoding runs once per job, off the hot path)."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype):
        self.dim, self.device, self.dtype = dim, device, dtype

    def to(self, *_a, **_k):
        return self

    def encode(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(len(prompt))
        return torch.randn(min(512, 8 + len(prompt.split())), self.dim, generator=g).to(self.device, self.dtype)


@torch.no_grad()
def _randomize(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Meta-built module -> random weights on `device` in `dtype` (weights N(0, 1/fan_in), norms 1, others
    N(0, 0.02)); allocated once, directly at the storage dtype, like the loaders do."""
    module = module.to(dtype).to_empty(device=device)
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point():
            p.zero_()
        elif p.dim() >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        elif name.endswith(("weight", "gamma")):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return module


def full_size_models(device: torch.device, dtype: torch.dtype, layers: int = 40):
    from infinitetalk.checkpoints.materialize import build_on_meta
    from infinitetalk.models.clip_vision import ClipVisionConfig, ClipVisionEncoder
    from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT
    from infinitetalk.models.vae import VAEConfig, WanVAE
    from infinitetalk.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder
    from infinitetalk.pipeline.models import ModelBundle

    cfg = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=layers)
    dit = _randomize(build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=dtype)), device, dtype)
    vae = _randomize(build_on_meta(lambda: WanVAE(VAEConfig())), device, torch.float32)
    clip = _randomize(build_on_meta(lambda: ClipVisionEncoder(ClipVisionConfig())), device, dtype)
    w2v = _randomize(build_on_meta(lambda: Wav2Vec2Encoder(Wav2Vec2Config())), "cpu", torch.float32)
    return ModelBundle(dit=dit, wav2vec2=w2v, text_encoder=RandomTextEncoder(cfg.text_dim, device, dtype),
                       clip_vision=clip, vae=vae, device=torch.device(device), dtype=dtype, offload=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random checkpoints on the CPU (smoke run)")
    ap.add_argument("--seconds", type=float, default=None, help="audio length (default 10 s; 4 s with --tiny)")
    ap.add_argument("--resolution", default="480p", choices=("480p", "720p"))
    ap.add_argument("--presets", nargs="+", default=["fast", "quality"])
    ap.add_argument("--steps", type=int, default=None, help="override the presets' step counts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", type=int, default=40, help="DiT blocks (40 = the real model; fewer for smoke runs)")
    ap.add_argument("--size-scale", type=float, default=None, help="shrink the output size (smoke runs)")
    args = ap.parse_args()

    from infinitetalk.audio.io import write_wav
    from infinitetalk.demo import synthetic_voice, two_faces_image, write_png
    from infinitetalk.pipeline.generate import generate
    from infinitetalk.pipeline.request import GenerationRequest

    seconds = args.seconds or (4.0 if args.tiny else 10.0)
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.tiny:
            from infinitetalk.pipeline.models import load_models
            from infinitetalk.tiny import make_tiny_models

            make_tiny_models(tmp / "models")
            bundles = {p: load_models(tmp / "models", preset=p, device=args.device or "cpu", dtype="fp32")
                       for p in args.presets}
            size_scale = 0.1
        else:
            device = torch.device(args.device or "cuda")
            if device.type == "cuda" and not torch.cuda.is_available():
                print("no CUDA device: run with --tiny for a CPU smoke run", file=sys.stderr)
                return 2
            shared = full_size_models(device, torch.bfloat16, args.layers)   # random weights: no LoRA merge needed
            bundles = {p: shared for p in args.presets}
            size_scale = args.size_scale or 1.0
        load_s = time.perf_counter() - t0
        half = seconds / 2
        left = write_wav(tmp / "l.wav", synthetic_voice(half, 120.0, seed=1)[None], 24000)
        right = write_wav(tmp / "r.wav", synthetic_voice(half, 210.0, seed=2)[None], 24000)
        image = write_png(tmp / "two.png", two_faces_image(640, 640))
        rows = []
        for preset in args.presets:
            req = GenerationRequest(left_audio=left, right_audio=right, image=image, out=tmp / f"{preset}.mp4",
                                    order="left_right", seed=0, preset=preset, steps=args.steps,
                                    resolution=args.resolution, size_scale=size_scale)
            dev = bundles[preset].device
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t = time.perf_counter()
            r = generate(req, bundles[preset])
            wall = time.perf_counter() - t
            row = {"preset": preset, "resolution": args.resolution, "size": [r.height, r.width],
                   "video_s": r.seconds, "windows": r.windows, "steps": r.settings["steps"],
                   "calls_per_step": 2 if r.settings["text_guidance"] == 1.0 else 3, "wall_s": round(wall, 1),
                   "s_per_video_s": round(wall / r.seconds, 2), "device": str(dev)}
            if dev.type == "cuda":
                row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)
                row["gpu"] = torch.cuda.get_device_name(dev)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmodel build/load {load_s:.1f}s")
    print("| preset | res | size | video s | windows | steps x calls | wall s | s per video s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['resolution']} | {r['size'][0]}x{r['size'][1]} | {r['video_s']:.1f} | "
              f"{r['windows']} | {r['steps']}x{r['calls_per_step']} | {r['wall_s']} | {r['s_per_video_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
