"""Seconds per InfiniteTalk DiT call and model-FLOP utilisation (MFU), random weights, no checkpoint.

    python benchmarks/bench_dit.py                 # 14B config, CUDA, bf16, 480p chunk (21×80×80 latent), 2 speakers
    python benchmarks/bench_dit.py --tiny          # tiny config on CPU: checks that the script works
    python benchmarks/bench_dit.py --persons 1 --frames 21 --height 112 --width 112   # 720p-ish, one speaker

The model is built on the meta device and every tensor is drawn directly on the target device at the
storage dtype, so a 14B run needs ~38 GB of GPU memory for weights and no host copy. FLOPs are counted
analytically (matmuls and attention, 2 FLOPs per multiply-add), as the reference computes them.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinitetalk.checkpoints import build_on_meta, load_module  # noqa: E402
from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT  # noqa: E402

FULL_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64, image_dim=32, intermediate_dim=16,
            output_dim=32, context_tokens=4, audio_layers=2, audio_channels=16)
# dense bf16 tensor-core peaks (FLOP/s), by substring of torch.cuda.get_device_name()
PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
         ("4090", 165e12), ("A10", 125e12))


class RandomWeights(Mapping[str, torch.Tensor]):
    """Tensors drawn on demand (one at a time) with the model's state-dict shapes."""

    def __init__(self, shapes: dict[str, torch.Size], device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.shapes, self.device, self.dtype = shapes, device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=self.dtype)
        if "modulation" in name:
            return t.mul_(0.1)
        if len(shape) >= 2:
            return t.mul_(1 / math.sqrt(math.prod(shape[1:])))
        return t.mul_(0.05) if name.endswith("bias") else t.mul_(0.1).add_(1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def dit_flops(cfg: DiTConfig, frames: int, height: int, width: int, persons: int, clip_tokens: int = 257) -> float:
    """Analytic FLOPs of one forward (latent `frames×height×width`), reference algorithm."""
    pf, ph, pw = cfg.patch_size
    n_t, n_h, n_w = frames // pf, height // ph, width // pw
    L, S, d, text = n_t * n_h * n_w, n_h * n_w, cfg.dim, cfg.text_len
    n_a = persons * cfg.context_tokens
    block = (
        4 * 2 * L * d * d + 2 * 2 * L * L * d                                   # self-attention
        + 2 * 2 * L * d * d + 2 * 2 * (text + clip_tokens) * d * d + 2 * 2 * L * (text + clip_tokens) * d  # text+image
        + 2 * 2 * L * d * d + 2 * n_t * n_a * cfg.output_dim * 2 * d + 2 * 2 * L * n_a * d              # audio
        + 2 * 2 * L * d * cfg.ffn_dim                                           # FFN
        + (2 * L * S * d + 2 * L * S * 3 if persons == 2 else 0)                # L-RoPE reference map
    )
    inter, tok = cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim
    outside = (
        2 * L * cfg.in_dim * pf * ph * pw * d + 2 * L * d * pf * ph * pw * cfg.out_dim         # patchify + head
        + 2 * text * (cfg.text_dim * d + d * d) + 2 * clip_tokens * (cfg.image_dim ** 2 + cfg.image_dim * d)
        + 2 * persons * (cfg.audio_in_first * inter + (n_t - 1) * cfg.audio_in_later * inter
                         + n_t * (inter * inter + inter * tok))
    )
    return float(cfg.num_layers * block + outside)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS:
        if key in name:
            return peak, name
    return None, name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--frames", type=int, default=None, help="latent frames (default 21; 3 with --tiny)")
    ap.add_argument("--height", type=int, default=None, help="latent height (default 80 = 640 px; 8 with --tiny)")
    ap.add_argument("--width", type=int, default=None, help="latent width (default 80; 8 with --tiny)")
    ap.add_argument("--persons", type=int, default=2, choices=(1, 2))
    ap.add_argument("--text-tokens", type=int, default=40, help="real prompt tokens (padded to text_len anyway)")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = DiTConfig(**(TINY if args.tiny else FULL_14B))
    frames = args.frames or (3 if args.tiny else 21)
    height, width = args.height or (8 if args.tiny else 80), args.width or (8 if args.tiny else 80)

    t0 = time.perf_counter()
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=dtype, attention=args.attention))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    load_module(model, RandomWeights(shapes, device, dtype), dtype=dtype, device=device)
    n_params = sum(math.prod(s) for s in shapes.values())
    print(f"built {n_params / 1e6:,.1f} M params on {device} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")

    g = torch.Generator(device=device).manual_seed(1)

    def rand(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    masks = torch.zeros(3, height, width, device=device)
    masks[0, :, : width // 2], masks[1, :, width // 2:] = 1, 1
    masks[2, : height // 8] = 1
    masks[:2, : height // 8] = 0
    inputs = (rand(cfg.out_dim, frames, height, width), torch.tensor([900.0], device=device),
              rand(args.text_tokens, cfg.text_dim), rand(1, 257, cfg.image_dim),
              rand(cfg.in_dim - cfg.out_dim, frames, height, width),
              rand(args.persons, cfg.vae_scale * (frames - 1) + 1, cfg.audio_window, cfg.audio_layers,
                   cfg.audio_channels), masks)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            sync()
            start = time.perf_counter()
            out = model(*inputs)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    assert out.shape == (cfg.out_dim, frames, height, width) and torch.isfinite(out).all(), "bad output"

    seconds = min(times)
    flops = dit_flops(cfg, frames, height, width, args.persons)
    tokens = (frames // cfg.patch_size[0]) * (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
    peak, peak_src = peak_flops(device, args.peak_tflops)
    print(f"latent {cfg.out_dim}x{frames}x{height}x{width} -> {tokens} tokens, {args.persons} speaker(s), "
          f"attention={args.attention}")
    print(f"seconds per call: {seconds:.3f} (min of {len(times)}; all: {', '.join(f'{t:.3f}' for t in times)})")
    amount = f"{flops / 1e15:.3f} PFLOP" if flops > 1e13 else f"{flops / 1e9:.3f} GFLOP"
    print(f"model FLOPs per call: {amount} -> {flops / seconds / 1e12:.4g} TFLOP/s")
    if peak:
        print(f"MFU: {100 * flops / seconds / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s ({peak_src})")
    else:
        print(f"MFU: n/a (no known bf16 peak for {peak_src}; pass --peak-tflops)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
