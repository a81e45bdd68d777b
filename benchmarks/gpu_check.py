"""One GPU check: every number BENCHMARKS.md needs from a lent H100/H200, in one command, random weights.

    python benchmarks/gpu_check.py                    # CUDA: full 14B shapes, < 8 min from a cold start
    python benchmarks/gpu_check.py --smoke            # the same code on the CPU at tiny size (< 1 min; CI runs it)
    python benchmarks/gpu_check.py --out DIR          # where gpu_check.json and .md go (default: benchmarks/out)

Sections (each timed and guarded: one failure is recorded and the rest still run; a global deadline skips
what would not finish in time):
  env        device, torch, compute capability, measured dense bf16 matmul peak (the MFU denominator)
  dit        s per DiT call, bf16 and fp8 (dequantise-per-call and `_scaled_mm`), 480p (21×80×80 latent =
             33,600 tokens) and 720p (21×120×120), MFU against the measured peak and the datasheet peak
  budget     fp8 DiT at 480p under VRAM budgets 12 / 16 / 24 GB and unlimited: blocks streamed, peak memory,
             s per call and slowdown against unlimited
  vae        decode of one 81-frame 480p window (real VAE config)
  e2e        one `fast` window (6 steps × 2 guidance calls + VAE decode) → seconds per video-second
  e2e_turbo  one `turbo` window (4 steps × 1 call, the 4-step distilled recipe, + VAE decode) → the same
  agreement  GPU vs CPU fp32 on a small DiT config (rel L2)
Weights are drawn on the device at the storage dtype (no downloads, no host copy of 14B).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_dit import FULL_14B, TINY, RandomWeights, dit_flops, peak_flops  # noqa: E402
from infinitetalk.checkpoints import build_on_meta, load_module  # noqa: E402
from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT  # noqa: E402

GIB = 2**30
FAST_CALLS = 2                         # the `fast` preset's guidance calls per step (the budget section's job)
NEW_FRAMES_PER_WINDOW = 72             # 81-frame window, 9 motion frames carried over
FPS = 25


class Report:
    """Collects results per section; a section that raises is recorded with its error, never aborts the run."""

    def __init__(self, deadline_s: float):
        self.t0 = time.perf_counter()
        self.deadline_s = deadline_s
        self.data: dict = {"sections": {}}

    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn: Callable[[], dict], needs_s: float = 0.0) -> dict | None:
        if self.left() < needs_s:
            self.data["sections"][name] = {"skipped": f"deadline: {self.left():.0f} s left, needs ~{needs_s:.0f} s"}
            print(f"[{name}] skipped (deadline)", flush=True)
            return None
        start = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures and goes on
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)}
            print(f"[{name}] FAILED: {result['error']}", flush=True)
        result["section_s"] = round(time.perf_counter() - start, 2)
        self.data["sections"][name] = result
        print(f"[{name}] {json.dumps({k: v for k, v in result.items() if k != 'traceback'}, default=str)}", flush=True)
        _free()
        return result


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[float, object]:
    """Minimum wall time of `iters` calls after `warmup` calls, and the last result."""
    out, times = None, []
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return min(times), out


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------- building blocks
def build_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
              attention: str = "sdpa") -> InfiniteTalkDiT:
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=dtype, attention=attention))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return load_module(model, RandomWeights(shapes, device, dtype, seed=seed), dtype=dtype, device=device)


@torch.no_grad()
def quantize_fp8(model: torch.nn.Module) -> int:
    """Every 2-D Linear weight of the blocks → float8_e4m3fn with a per-tensor scale (the ComfyUI "scaled fp8"
    layout the loaders produce from real files). Returns the bytes of the model's tensors after."""
    from infinitetalk.models.layers import Linear

    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.startswith("blocks."):
            w = module.weight.data
            scale = (w.abs().amax().float() / 448.0).clamp_min(1e-12)
            module.weight = torch.nn.Parameter((w.float() / scale).to(torch.float8_e4m3fn), requires_grad=False)
            module.weight_scale = scale.reshape(()).to(w.device)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def dit_inputs(cfg: DiTConfig, frames: int, h: int, w: int, device: torch.device, dtype: torch.dtype,
               persons: int = 2, seed: int = 1) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    masks = torch.zeros(3, h, w, device=device)
    masks[0, :, : w // 2], masks[1, :, w // 2:] = 1, 1
    masks[2, : h // 8] = 1
    masks[:2, : h // 8] = 0
    return (rand(cfg.out_dim, frames, h, w), torch.tensor([900.0], device=device), rand(40, cfg.text_dim),
            rand(1, 257, cfg.image_dim), rand(cfg.in_dim - cfg.out_dim, frames, h, w),
            rand(persons, cfg.vae_scale * (frames - 1) + 1, cfg.audio_window, cfg.audio_layers, cfg.audio_channels),
            masks)


def configure(model: InfiniteTalkDiT, device: torch.device, **options) -> dict:
    """Apply the runtime's kernels / placement to a built DiT; returns what was applied (for the report)."""
    from infinitetalk.ops.options import RuntimeOptions

    opts = RuntimeOptions(**options)
    applied: dict = {"options": opts.to_dict()}
    try:
        from infinitetalk.runtime.kernels import configure_dit
    except ImportError as exc:
        applied["kernels"] = f"unavailable: {exc}"
    else:
        applied["kernels"] = str(configure_dit(model, opts, device))
    return applied


# ---------------------------------------------------------------------------------------------- sections
def section_env(device: torch.device, smoke: bool) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / GIB, 1))
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    b = torch.randn(n, n, device=device, dtype=a.dtype)
    seconds, _ = _timed(lambda: a @ b, device, warmup=2, iters=5 if smoke else 20)
    info["matmul_peak_tflops"] = round(2 * n**3 / seconds / 1e12, 2)
    info["matmul_dtype"] = str(a.dtype).replace("torch.", "")
    return info


def section_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, sizes: dict[str, tuple[int, int, int]],
                measured_peak: float | None, smoke: bool) -> dict:
    out: dict = {}
    datasheet, src = peak_flops(device, None)
    iters = 1 if smoke else 2
    model = build_dit(cfg, device, dtype)
    for label, (f, h, w) in sizes.items():
        inputs = dit_inputs(cfg, f, h, w, device, dtype)
        _reset_peak(device)
        with torch.inference_mode():
            s, y = _timed(lambda: model(*inputs), device, warmup=1, iters=iters)
        assert torch.isfinite(y).all(), "non-finite DiT output"
        flops = dit_flops(cfg, f, h, w, persons=2)
        row = {"tokens": f * (h // 2) * (w // 2), "s_per_call": round(s, 4), "tflops": round(flops / s / 1e12, 2),
               "peak_gib": _gib(_peak_bytes(device))}
        if measured_peak:
            row["mfu_vs_measured"] = round(flops / s / (measured_peak * 1e12), 3)
        if datasheet:
            row["mfu_vs_datasheet"] = round(flops / s / datasheet, 3)
        out[f"{str(dtype).replace('torch.', '')}_{label}"] = row
    out["datasheet_peak"] = src
    # fp8: the same weights quantised per tensor, dequantise-per-call vs `_scaled_mm`
    out["fp8_model_gib"] = round(quantize_fp8(model) / GIB, 2)
    for mode in ("off", "on"):
        out[f"fp8_matmul_{mode}_applied"] = configure(model, device, fp8_matmul=mode)
        for label, (f, h, w) in sizes.items():
            if label != "480p" and not smoke and mode == "off":
                continue  # 720p fp8 only with the fast path (time)
            inputs = dit_inputs(cfg, f, h, w, device, dtype)
            _reset_peak(device)
            with torch.inference_mode():
                s, y = _timed(lambda: model(*inputs), device, warmup=1, iters=iters)
            assert torch.isfinite(y).all(), "non-finite fp8 DiT output"
            out[f"fp8_{mode}_{label}"] = {"s_per_call": round(s, 4), "peak_gib": _gib(_peak_bytes(device))}
    del model
    return out


def section_budget(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, size: tuple[int, int, int],
                   budgets: list[float | None], smoke: bool) -> dict:
    """fp8 DiT under VRAM budgets, placed by the runtime exactly as a job is (`ModelBundle.prepare`): the blocks
    that do not fit stream from pinned host memory, prefetched on a side stream."""
    from infinitetalk.pipeline.models import ModelBundle
    from infinitetalk.runtime.budget import JobShape

    out: dict = {}
    f, h, w = size
    model = build_dit(cfg, device, dtype)
    quantize_fp8(model)
    configure(model, device, fp8_matmul="auto")
    bundle = ModelBundle(dit=model, wav2vec2=None, text_encoder=None, clip_vision=None, vae=None, device=device,
                         dtype=dtype)
    job = JobShape.for_window(h * 8, w * 8, 4 * (f - 1) + 1, calls_per_step=FAST_CALLS)
    inputs = dit_inputs(cfg, f, h, w, device, dtype)
    base = None
    for budget in budgets:
        bundle.budget = None if budget is None else int(budget * GIB)
        plan = bundle.prepare(job)
        _free()
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        _reset_peak(device)
        with torch.inference_mode():
            s, y = _timed(lambda: model(*inputs), device, warmup=1, iters=1 if smoke else 2)
        assert torch.isfinite(y).all()
        label = "unlimited" if budget is None else f"{budget:g}GB"
        base = s if budget is None else base
        p = plan.placement
        out[label] = {"s_per_call": round(s, 4), "streamed_blocks": len(p.streamed), "of": p.num_blocks,
                      "guidance_batch": p.max_guidance_batch, "fits": p.fits,
                      "predicted_dit_peak_gib": round(p.dit_peak / GIB, 2), "resident_gib": _gib(resident),
                      "peak_gib": _gib(_peak_bytes(device))}
    for row in out.values():
        if base:
            row["slowdown"] = round(row["s_per_call"] / base, 3)
    del model, bundle, inputs
    return out


def section_vae(device: torch.device, latent: tuple[int, int, int]) -> dict:
    from infinitetalk.models.vae import VAEConfig, WanVAE
    from infinitetalk.tiny.layouts import random_state_dict

    cfg = VAEConfig()
    model = build_on_meta(lambda: WanVAE(cfg))
    model = load_module(model, random_state_dict(model, seed=0), dtype=torch.float32, device=device, source="random")
    z = torch.randn(cfg.z_dim, *latent, generator=torch.Generator().manual_seed(0)).to(device)
    _reset_peak(device)

    def decode() -> int:
        frames = 0
        for chunk in model.decode_stream(z):
            frames += chunk.shape[1]
        return frames

    with torch.inference_mode():
        s, frames = _timed(decode, device, warmup=0, iters=1)
    return {"latent": list(latent), "frames": frames, "s": round(s, 3), "peak_gib": _gib(_peak_bytes(device))}


def section_e2e(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, size: tuple[int, int, int],
                preset: str, vae_s: float | None, smoke: bool) -> dict:
    """One window of `preset` (its steps, guidance calls batched when the runtime allows, shift at 480p) on
    the DiT, plus the window's VAE decode (measured above); encoders run once per job and are left out.
    The smoke run takes 2 steps."""
    from infinitetalk.pipeline.request import PRESETS
    from infinitetalk.pipeline.sampler import Guidance, WindowConditioning, sample_window
    from infinitetalk.pipeline.schedule import timesteps

    p = PRESETS[preset]
    steps, guidance = (2 if smoke else p.steps), Guidance(p.text_guidance, p.audio_guidance)
    calls = guidance.calls_per_step
    f, h, w = size
    model = build_dit(cfg, device, dtype)
    if not smoke:
        quantize_fp8(model)
    configure(model, device, fp8_matmul="auto")
    x, _t, ctx, clip, y, audio, masks = dit_inputs(cfg, f, h, w, device, dtype)
    cond = WindowConditioning(context=ctx, context_null=ctx, clip_fea=clip, y=y, audio=audio, ref_target_masks=masks)
    times = timesteps(steps, p.shift_at("480p"))
    motion = torch.zeros(cfg.out_dim, 1, h, w, device=device)
    with torch.inference_mode():
        s, latent = _timed(lambda: sample_window(model, x.float(), cond, times, guidance, motion, batch=calls),
                           device, warmup=0, iters=1)
    assert torch.isfinite(latent).all()
    total = s + (vae_s or 0.0)
    video_s = NEW_FRAMES_PER_WINDOW / FPS
    return {"preset": preset, "steps": steps, "calls_per_step": calls, "guidance_batch": calls,
            "dit": "fp8" if not smoke else "fp32", "sampling_s": round(s, 3), "vae_decode_s": vae_s,
            "window_s": round(total, 3), "video_s_per_window": video_s,
            "s_per_video_second": round(total / video_s, 3)}


def section_agreement(device: torch.device) -> dict:
    """The same small fp32 DiT on the CPU and on `device`: relative L2 of the outputs (kernels, not maths)."""
    cfg = DiTConfig(**TINY)
    cpu = build_dit(cfg, torch.device("cpu"), torch.float32, seed=3)
    inputs = dit_inputs(cfg, 3, 8, 12, torch.device("cpu"), torch.float32, seed=4)
    with torch.inference_mode():
        ref = cpu(*inputs)
        other = cpu.to(device)(*(t.to(device) for t in inputs)).cpu()
    rel = float((other - ref).norm() / ref.norm())
    return {"config": "tiny fp32, 2 speakers, latent 3×8×12", "rel_l2": rel, "ok": rel <= 1e-5}


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


# ---------------------------------------------------------------------------------------------- report
def markdown(data: dict) -> str:
    env = data["sections"].get("env", {})
    lines = [f"GPU check — {env.get('date', '?')}, {env.get('name', env.get('device', '?'))}, torch {env.get('torch')}"
             f"{', smoke (CPU, tiny)' if data.get('smoke') else ''}", "",
             "| section | setting | result |", "|---|---|---|"]
    for name, sec in data["sections"].items():
        if "error" in sec or "skipped" in sec:
            lines.append(f"| {name} | | {'FAILED: ' + sec['error'] if 'error' in sec else sec['skipped']} |")
            continue
        for key, value in sec.items():
            if key == "section_s":
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items() if not isinstance(v, dict))
            lines.append(f"| {name} | {key} | {value} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 1 min)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"),
                    help="folder for gpu_check.json and gpu_check.md (default: benchmarks/out, git-ignored)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for everything (default 450; smoke 50)")
    args = ap.parse_args(argv)

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = DiTConfig(**(TINY if smoke else FULL_14B))
    sizes = {"480p": (3, 8, 8), "720p": (3, 8, 12)} if smoke else {"480p": (21, 80, 80), "720p": (21, 120, 120)}
    budgets = [None, 0.002, 0.004] if smoke else [None, 24.0, 16.0, 12.0]
    report = Report(args.deadline or (50.0 if smoke else 450.0))
    report.data["smoke"] = smoke

    env = report.run("env", lambda: section_env(device, smoke)) or {}
    peak = env.get("matmul_peak_tflops")
    report.run("dit", lambda: section_dit(cfg, device, dtype, sizes, peak, smoke), needs_s=5 if smoke else 120)
    report.run("budget", lambda: section_budget(cfg, device, dtype, sizes["480p"], budgets, smoke),
               needs_s=3 if smoke else 90)
    vae = report.run("vae", lambda: section_vae(device, (2, 4, 4) if smoke else (21, 80, 80)),
                     needs_s=3 if smoke else 40) or {}
    report.run("e2e", lambda: section_e2e(cfg, device, dtype, sizes["480p"], "fast", vae.get("s"), smoke),
               needs_s=3 if smoke else 80)
    report.run("e2e_turbo", lambda: section_e2e(cfg, device, dtype, sizes["480p"], "turbo", vae.get("s"), smoke),
               needs_s=3 if smoke else 45)
    report.run("agreement", lambda: section_agreement(device if not smoke else torch.device("cpu")), needs_s=2)
    report.data["total_s"] = round(time.perf_counter() - report.t0, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report.data, indent=2, default=str))
    md = markdown(report.data)
    (out / "gpu_check.md").write_text(md)
    print(md)
    failed = [k for k, v in report.data["sections"].items() if "error" in v]
    print(f"done in {report.data['total_s']} s; failed sections: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
