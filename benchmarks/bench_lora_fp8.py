"""LoRA on fp8 weights: memory, speed and error of the ways to apply it, against the bf16 merge.

    python benchmarks/bench_lora_fp8.py                    # one 14B-sized layer (5120×5120 and 13824×5120), CPU
    python benchmarks/bench_lora_fp8.py --device cuda      # the same on a GPU
    python benchmarks/bench_lora_fp8.py --tiny-tree        # + DiT block bytes of the tiny fp8 model ± distill LoRA

Strategies for a Linear whose weight is fp8 e4m3 with a per-tensor scale, and a LoRA (down, up):
- `bf16 merge`: dequantise, add up@down in float32, store bf16 (what loading did before; the reference);
- `low-rank`: weight stays fp8, x·downᵀ·upᵀ added in bf16 per call (what the loader does now);
- `requantise`: merge in float32, quantise again to e4m3 with a fresh per-tensor scale amax/448.
Error: max |y − y_merge| / max |y_merge| over random activations (y in bf16).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinitetalk.models.layers import FP8_MAX, Linear  # noqa: E402


def _linear(weight: torch.Tensor, scale: torch.Tensor | None) -> Linear:
    lin = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    lin.weight_scale = scale
    return lin


def _bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + [b for b in m.buffers() if b is not None])


def _time(fn, x: torch.Tensor, repeat: int) -> float:
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def bench_layer(out_f: int, in_f: int, rank: int, tokens: int, device: str, repeat: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    scale = w.abs().amax() / FP8_MAX
    w8 = (w / scale).to(torch.float8_e4m3fn)
    down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
    up = torch.randn(out_f, rank, generator=g) * 0.02  # distill LoRAs move weights by a few % of their size
    merged32 = w8.float() * scale + up @ down
    layers = {
        "bf16 merge": _linear(merged32.bfloat16(), None),
        "low-rank": _linear(w8, scale.clone()),
        "requantise": _linear((merged32 / (merged32.abs().amax() / FP8_MAX)).to(torch.float8_e4m3fn),
                              merged32.abs().amax() / FP8_MAX),
    }
    layers["low-rank"].lora_down, layers["low-rank"].lora_up = down.bfloat16(), up.bfloat16()
    x = torch.randn(tokens, in_f, generator=g).bfloat16().to(device)
    for m in layers.values():
        m.to(device)
    with torch.inference_mode():
        ref = layers["bf16 merge"](x).float()
        rows = []
        base_bytes = out_f * in_f  # the fp8 weight alone
        for name, m in layers.items():
            err = ((m(x).float() - ref).abs().max() / ref.abs().max()).item()
            sec = _time(m, x, repeat)
            rows.append(f"| {out_f}×{in_f} | {rank} | {name} | {_bytes(m) / base_bytes:.3f} | {sec * 1e3:.1f} | {err:.2e} |")
    return rows


def tiny_tree_bytes() -> list[str]:
    from infinitetalk.loaders.dit import load_dit
    from infinitetalk.tiny.dit import write

    with tempfile.TemporaryDirectory() as d:
        write(d)
        base = Path(d) / "diffusion_models/tiny_wan2.1_i2v_480p_fp8_scaled.safetensors"
        patch = Path(d) / "model_patches/tiny_wan2.1_infiniteTalk_multi_fp16.safetensors"
        lora = Path(d) / "loras/tiny_lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors"
        rows = []
        for name, loras in (("no LoRA", []), ("distill LoRA", [(lora, 1.0)])):
            model = load_dit(base, patch, loras, dtype=torch.bfloat16)
            by_dtype: dict[str, int] = {}
            for t in list(model.blocks.parameters()) + [b for b in model.blocks.buffers() if b is not None]:
                key = str(t.dtype).replace("torch.", "")
                by_dtype[key] = by_dtype.get(key, 0) + t.numel()
            total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            rows.append(f"| {name} | {', '.join(f'{v:,} {k}' for k, v in sorted(by_dtype.items()))} | {total:,} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ranks", default="32,64,128")
    ap.add_argument("--tiny-tree", action="store_true")
    args = ap.parse_args()
    print("| layer | rank | strategy | bytes / fp8 weight | ms per call | rel. error vs bf16 merge |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f in ((5120, 5120), (13824, 5120)):
        for rank in (int(r) for r in args.ranks.split(",")):
            for row in bench_layer(out_f, in_f, rank, args.tokens, args.device, args.repeat):
                print(row, flush=True)
    if args.tiny_tree:
        print("\n| tiny fp8 DiT | block values by dtype | DiT bytes |\n|---|---|---|")
        for row in tiny_tree_bytes():
            print(row)


if __name__ == "__main__":
    main()
