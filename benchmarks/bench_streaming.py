"""Cost of block streaming on a GPU: DiT calls at a real window size with every block resident, then under
a VRAM budget (blocks streamed from pinned host memory), with random full-size weights.

    python benchmarks/bench_streaming.py --vram 12 [--fp8] [--layers 40] [--resolution 480p] [--calls 4]

Prints per placement: streamed blocks, seconds per DiT call, peak allocated GPU memory, the planned peak,
and the slowdown (target: <= 1.3x at 12 GB). Results go to BENCHMARKS.md. Needs about 35 GB of host memory
for the 40-layer bf16 model (17 GB with --fp8). CPU smoke run: --device cpu --layers 2 --size-scale 0.1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_dit(layers: int, fp8: bool, dtype: torch.dtype):
    """Full-width InfiniteTalk DiT on the CPU with random weights (block Linears in fp8 + scale with --fp8)."""
    from infinitetalk.checkpoints.materialize import build_on_meta
    from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT
    from infinitetalk.models.layers import Linear

    cfg = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=layers)
    dit = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=dtype)).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in dit.named_parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0 if name.endswith("weight") else 0.0)
        dit.to(dtype)
        if fp8:
            for name, m in dit.named_modules():
                if isinstance(m, Linear) and name.startswith("blocks."):
                    m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
                    m.weight_scale = torch.tensor(1.0)
    return dit.requires_grad_(False).eval()


def dit_inputs(cfg, job, device, dtype) -> dict:
    lh, lw = job.height // 8, job.width // 8
    t = job.latent_frames
    masks = torch.zeros(3, lh, lw, device=device)
    masks[0, :, : lw // 2], masks[1, :, lw // 2:] = 1, 1
    return dict(x=torch.randn(16, t, lh, lw, device=device), t=torch.tensor([500.0], device=device),
                context=torch.randn(200, cfg.text_dim, device=device, dtype=dtype),
                clip_fea=torch.randn(1, 257, cfg.image_dim, device=device, dtype=dtype),
                y=torch.randn(20, t, lh, lw, device=device),
                audio=torch.randn(2, 4 * (t - 1) + 1, cfg.audio_window, cfg.audio_layers, cfg.audio_channels,
                                  device=device, dtype=dtype),
                ref_target_masks=masks)


def timed_calls(bundle, inputs, calls: int) -> tuple[float, int]:
    cuda = bundle.device.type == "cuda"
    with torch.no_grad():
        bundle.dit(**inputs)                     # warm-up (kernels, allocator, first prefetch)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(calls):
            bundle.dit(**inputs)
        if cuda:
            torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return (time.perf_counter() - t0) / calls, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vram", type=float, default=12.0, help="budget in GB for the streamed run")
    ap.add_argument("--fp8", action="store_true", help="fp8 block weights (like the Comfy-Org fp8_scaled file)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--resolution", default="480p", choices=("480p", "720p"))
    ap.add_argument("--size-scale", type=float, default=1.0, help="shrink the frame (smoke runs)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--calls", type=int, default=4, help="timed DiT calls per placement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from infinitetalk.pipeline.models import ModelBundle
    from infinitetalk.runtime.budget import GiB, JobShape
    from infinitetalk.runtime.plan import largest_bucket

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = random_dit(args.layers, args.fp8, dtype)
    h, w = (max(16, int(s * args.size_scale) // 16 * 16) for s in largest_bucket(args.resolution))
    job = JobShape.for_window(h, w, args.frames, 1)
    bundle = ModelBundle(dit=dit, wav2vec2=None, text_encoder=None, clip_vision=None, vae=None, device=device,
                         dtype=dtype)
    inputs = dit_inputs(dit.config, job, device, dtype)
    results = {}
    for name, budget in (("resident", None), (f"{args.vram:g} GB", int(args.vram * GiB))):
        bundle.budget = budget
        plan = bundle.prepare(job)
        seconds, peak = timed_calls(bundle, inputs, args.calls)
        results[name] = seconds
        print(f"{name:>10}: {len(plan.placement.streamed):2d}/{args.layers} blocks streamed, {seconds:7.3f} s/call, "
              f"peak allocated {peak / GiB:6.2f} GiB (planned DiT step {plan.placement.dit_peak / GiB:6.2f} GiB, "
              f"fits {plan.fits})")
    base, streamed = results.values()
    print(f"slowdown: {streamed / base:.2f}x  ({h}x{w}, {job.tokens} tokens, {'fp8' if args.fp8 else 'bf16'} blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
