"""One GPU check: every number BENCHMARKS.md needs from a lent H100/H200, in one command, random weights.

    python benchmarks/gpu_check.py                    # CUDA: full 14B shapes, < 8 min from a cold start
    python benchmarks/gpu_check.py --smoke            # the same code on the CPU at tiny size (< 45 s; CI runs it)
    python benchmarks/gpu_check.py --out DIR          # where gpu_check.json and .md go (default: benchmarks/out)

Sections, in this order (each timed and guarded: one failure is recorded and the rest still run; a global
deadline skips an optional section that would not finish in time; `e2e` always runs):
  env        device, torch, compute capability, measured dense bf16 matmul peak (the MFU denominator)
  dit        the DEFAULT path first: bf16 weights, `RuntimeOptions()` kernels; s per DiT call at 480p
             (21×80×80 latent = 33,600 tokens) and 720p (21×120×120), MFU, peak allocated and *reserved* memory
  vae        decode of one 81-frame 480p window (real VAE config)
  e2e        one `fast` window on the default path (6 steps × 2 guidance calls + the VAE decode) → s per
             video-second
  turbo      one `turbo` window (4 steps, guidance 1.0, one DiT call per step): DiT calls counted, s per
             video-second
  attention  s per 480p DiT call with every attention backend this machine has (math skipped at full size:
             it materialises the L×L scores)
  fp8        the same weights as fp8 (per-tensor scale): dequantise-per-call (default) and `_scaled_mm`
  budget     fp8 weights, default kernels, under VRAM budgets 24 / 16 / 12 GB and unlimited, placed by
             `ModelBundle.prepare` exactly as a job is; each row runs under
             `torch.cuda.set_per_process_memory_fraction(budget)` and reports peak *reserved* memory against
             the plan's predicted peak, pinned host bytes against streamed bytes, s per call and slowdown
  agreement  GPU vs CPU fp32 on a small DiT config (rel L2) with TF32 off (TF32 alone fails the bound)
  compile    `--compile` on the default path in a child process (bounded by the time left): compile time,
             graphs compiled (each recompile counts), s per call compiled vs eager
Weights are drawn on the device at the storage dtype (no downloads, no host copy of 14B).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
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
FAST_CALLS = 2                         # the `fast` preset's guidance calls per step (cond + drop-audio)
NEW_FRAMES_PER_WINDOW = 72             # 81-frame window, 9 motion frames carried over
FPS = 25
COMPILE_MARK = "COMPILE_RESULT "


class Report:
    """Collects results per section; a section that raises is recorded with its error, never aborts the run."""

    def __init__(self, deadline_s: float):
        self.t0 = time.perf_counter()
        self.deadline_s = deadline_s
        self.data: dict = {"sections": {}}

    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn: Callable[[], dict], needs_s: float = 0.0) -> dict | None:
        """Run one section; `needs_s` 0 = always run (whatever the deadline says)."""
        if needs_s and self.left() < needs_s:
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


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: torch.device) -> dict:
    """Peak allocated and peak reserved GiB since the last reset (reserved is what the device really gave)."""
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": _gib(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved(device))}


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


# ---------------------------------------------------------------------------------------------- building blocks
def build_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> InfiniteTalkDiT:
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=dtype))
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


def configure(model: InfiniteTalkDiT, device: torch.device, compile_backend: str | Callable = "inductor",
              **options) -> str:
    """Apply `RuntimeOptions(**options)` (defaults = what a user gets) to a built DiT; returns what was applied."""
    from infinitetalk.ops.options import RuntimeOptions
    from infinitetalk.runtime.kernels import configure_dit

    return str(configure_dit(model, RuntimeOptions(**options), device, compile_backend=compile_backend))


class Bench:
    """What the sections share: the device, sizes, and one full-size DiT (bf16 until the fp8 section)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.cfg = DiTConfig(**(TINY if smoke else FULL_14B))
        self.sizes = {"480p": (3, 8, 8), "720p": (3, 8, 12)} if smoke else \
            {"480p": (21, 80, 80), "720p": (21, 120, 120)}
        self.budgets = [None, 0.002, 0.004] if smoke else [None, 24.0, 16.0, 12.0]
        self.peak_tflops: float | None = None
        self.vae_s: float | None = None
        self.default_s: float | None = None
        self._model: InfiniteTalkDiT | None = None

    @property
    def model(self) -> InfiniteTalkDiT:
        if self._model is None:
            self._model = build_dit(self.cfg, self.device, self.dtype)
            configure(self._model, self.device)
        return self._model

    def drop_model(self) -> None:
        self._model = None
        _free()

    def inputs(self, label: str = "480p") -> tuple:
        return dit_inputs(self.cfg, *self.sizes[label], self.device, self.dtype)

    def call_s(self, label: str = "480p", warmup: int = 1, iters: int | None = None) -> float:
        inputs = self.inputs(label)
        with torch.inference_mode():
            s, y = _timed(lambda: self.model(*inputs), self.device, warmup, iters or (1 if self.smoke else 2))
        assert torch.isfinite(y).all(), "non-finite DiT output"
        return s


# ---------------------------------------------------------------------------------------------- sections
def section_env(b: Bench) -> dict:
    device = b.device
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / GIB, 1))
    n = 512 if b.smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    c = torch.randn(n, n, device=device, dtype=a.dtype)
    seconds, _ = _timed(lambda: a @ c, device, warmup=2, iters=5 if b.smoke else 20)
    info["matmul_peak_tflops"] = b.peak_tflops = round(2 * n**3 / seconds / 1e12, 2)
    info["matmul_dtype"] = str(a.dtype).replace("torch.", "")
    return info


def section_dit(b: Bench) -> dict:
    """The default path: the weights' own dtype and `RuntimeOptions()` (what `generate` does unasked)."""
    datasheet, src = peak_flops(b.device, None)
    out: dict = {"kernels": configure(b.model, b.device), "datasheet_peak": src}
    for label, (f, h, w) in b.sizes.items():
        _reset_peak(b.device)
        s = b.call_s(label, warmup=1 if label == "480p" else 0, iters=None if label == "480p" else 1)
        flops = dit_flops(b.cfg, f, h, w, persons=2)
        row = {"tokens": f * (h // 2) * (w // 2), "s_per_call": round(s, 4), "tflops": round(flops / s / 1e12, 2),
               **_memory(b.device)}
        if b.peak_tflops:
            row["mfu_vs_measured"] = round(flops / s / (b.peak_tflops * 1e12), 3)
        if datasheet:
            row["mfu_vs_datasheet"] = round(flops / s / datasheet, 3)
        out[f"default_{label}"] = row
        b.default_s = b.default_s or s
    return out


def section_vae(b: Bench) -> dict:
    from infinitetalk.models.vae import VAEConfig, WanVAE
    from infinitetalk.tiny.layouts import random_state_dict

    cfg = VAEConfig(dim=8) if b.smoke else VAEConfig()
    latent = (2, 4, 4) if b.smoke else (21, 80, 80)
    model = build_on_meta(lambda: WanVAE(cfg))
    model = load_module(model, random_state_dict(model, seed=0), dtype=torch.float32, device=b.device, source="random")
    z = torch.randn(cfg.z_dim, *latent, generator=torch.Generator().manual_seed(0)).to(b.device)
    _reset_peak(b.device)

    def decode() -> int:
        return sum(chunk.shape[1] for chunk in model.decode_stream(z))

    with torch.inference_mode():
        s, frames = _timed(decode, b.device, warmup=0, iters=1)
    b.vae_s = round(s, 3)
    return {"latent": list(latent), "frames": frames, "s": b.vae_s, **_memory(b.device)}


def _window(b: Bench, steps: int, text_scale: float, audio_scale: float, batch: int) -> dict:
    """One window of `steps` Euler steps on the shared DiT, plus the window's VAE decode (measured above).
    Counts the DiT passes at block 0 (a batched guidance pass is one pass of `batch` rows)."""
    from infinitetalk.pipeline.sampler import Guidance, WindowConditioning, sample_window
    from infinitetalk.pipeline.schedule import timesteps

    f, h, w = b.sizes["480p"]
    x, _t, ctx, clip, y, audio, masks = b.inputs()
    cond = WindowConditioning(context=ctx, context_null=ctx, clip_fea=clip, y=y, audio=audio, ref_target_masks=masks)
    guidance = Guidance(text_scale, audio_scale)
    motion = torch.zeros(b.cfg.out_dim, 1, h, w, device=b.device)
    forwards = []
    hook = b.model.blocks[0].register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        with torch.inference_mode():
            s, latent = _timed(lambda: sample_window(b.model, x.float(), cond, timesteps(steps, 7.0), guidance, motion,
                                                     batch=batch), b.device, warmup=0, iters=1)
    finally:
        hook.remove()
    assert torch.isfinite(latent).all()
    total = s + (b.vae_s or 0.0)
    video_s = NEW_FRAMES_PER_WINDOW / FPS
    return {"steps": steps, "calls_per_step": guidance.calls_per_step, "guidance_batch": batch,
            "dit_passes": len(forwards), "sampling_s": round(s, 3), "vae_decode_s": b.vae_s,
            "window_s": round(total, 3), "video_s_per_window": video_s, "s_per_video_second": round(total / video_s, 3)}


def section_e2e(b: Bench) -> dict:
    """One `fast` window on the default path (both guidance calls batched, as the plan allows on one GPU)."""
    from infinitetalk.pipeline.request import PRESETS

    p = PRESETS["fast"]
    steps = 2 if b.smoke else p.steps
    return {"path": "default (weights' dtype, RuntimeOptions())",
            **_window(b, steps, p.text_guidance, p.audio_guidance, FAST_CALLS)}


def section_turbo(b: Bench) -> dict:
    """The `turbo` preset: 4 steps, guidance scales 1.0, one DiT call per step (`dit_passes` counts what
    the sampler really ran)."""
    from infinitetalk.pipeline.request import PRESETS

    p = PRESETS["turbo"]
    steps = 2 if b.smoke else p.steps
    row = _window(b, steps, p.text_guidance, p.audio_guidance, batch=FAST_CALLS)
    row["one_call_per_step"] = row["dit_passes"] == steps and row["calls_per_step"] == 1
    row["preset"] = "turbo"
    return row


def section_attention(b: Bench) -> dict:
    """Every attention backend this machine has, at 480p; the default's time is the dit section's."""
    from infinitetalk.errors import InputError
    from infinitetalk.ops.options import ATTENTION_CHOICES, RuntimeOptions
    from infinitetalk.runtime.kernels import check_kernels

    default = RuntimeOptions().attention
    out: dict = {}
    try:
        for name in ATTENTION_CHOICES:
            if name == default:
                out[name] = {"s_per_call": round(b.default_s, 4) if b.default_s else None, "note": "default (dit)"}
                continue
            if name == "math" and not b.smoke:
                out[name] = {"skipped": "materialises the L×L scores (≈ 90 GB at 480p)"}
                continue
            try:
                check_kernels(RuntimeOptions(attention=name), b.device)
            except InputError as exc:
                out[name] = {"absent": str(exc)[:160]}
                continue
            try:
                applied = configure(b.model, b.device, attention=name)
                _reset_peak(b.device)
                out[name] = {"s_per_call": round(b.call_s(iters=1), 4), "kernels": applied, **_memory(b.device)}
            except Exception as exc:  # noqa: BLE001 - a backend refusing a shape is a result
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        configure(b.model, b.device)
    return out


def section_fp8(b: Bench) -> dict:
    """The shared DiT's block weights become fp8 (it stays fp8 for the budget section)."""
    out: dict = {"fp8_model_gib": round(quantize_fp8(b.model) / GIB, 2)}
    for mode in ("off", "auto"):
        out[f"fp8_matmul_{mode}"] = {"kernels": configure(b.model, b.device, fp8_matmul=mode)}
        _reset_peak(b.device)
        out[f"fp8_matmul_{mode}"].update(s_per_call=round(b.call_s(), 4), **_memory(b.device))
    configure(b.model, b.device)
    return out


def section_budget(b: Bench) -> dict:
    """fp8 weights under VRAM budgets, placed by the runtime exactly as a job is (`ModelBundle.prepare`): the
    blocks that do not fit stream from pinned host arenas through a fixed ring of device buffers. Each row
    runs with the process held to its budget (`set_per_process_memory_fraction`): reserved, not allocated."""
    from infinitetalk.pipeline.models import ModelBundle
    from infinitetalk.runtime.budget import JobShape

    device, cuda = b.device, b.device.type == "cuda"
    f, h, w = b.sizes["480p"]
    model = b.model
    bundle = ModelBundle(dit=model, wav2vec2=None, text_encoder=None, clip_vision=None, vae=None, device=device,
                         dtype=b.dtype)
    job = JobShape.for_window(h * 8, w * 8, 4 * (f - 1) + 1, calls_per_step=FAST_CALLS)
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    out: dict = {}
    base = None
    try:
        for budget in b.budgets:
            label = "unlimited" if budget is None else f"{budget:g}GB"
            bundle.budget = None if budget is None else int(budget * GIB)
            p = bundle.prepare(job).placement
            _free()
            streamer = bundle.streamer
            row = {"streamed_blocks": len(p.streamed), "of": p.num_blocks, "guidance_batch": p.max_guidance_batch,
                   "fits": p.fits, "predicted_dit_peak_gib": _gib(p.dit_peak),
                   "streamed_bytes": streamer.host_bytes if streamer else 0,
                   "pinned_host_bytes": streamer.arena_bytes if streamer else 0}
            if streamer:
                row["pinned_over_streamed"] = round(streamer.arena_bytes / max(1, streamer.host_bytes), 4)
            if cuda and budget is not None:
                row["memory_fraction"] = round(min(1.0, bundle.budget / total), 4)
                torch.cuda.set_per_process_memory_fraction(row["memory_fraction"], device)
            _reset_peak(device)
            try:
                row["s_per_call"] = round(b.call_s(warmup=0 if b.smoke else 1), 4)
            except torch.OutOfMemoryError as exc:   # the plan let through what the budget cannot hold
                row["oom"] = str(exc).splitlines()[0][:200]
            finally:
                if cuda:
                    torch.cuda.set_per_process_memory_fraction(1.0, device)
            row.update(_memory(device))
            if "peak_reserved_gib" in row:
                row["reserved_within_plan"] = row["peak_reserved_gib"] <= row["predicted_dit_peak_gib"]
            base = row.get("s_per_call") if budget is None else base
            out[label] = row
    finally:
        bundle.budget = None
        bundle.prepare(job)   # everything resident again
    for row in out.values():
        if base and "s_per_call" in row:
            row["slowdown"] = round(row["s_per_call"] / base, 3)
    return out


def section_agreement(device: torch.device) -> dict:
    """The same small fp32 DiT on the CPU and on `device`: relative L2 of the outputs (kernels, not maths).
    TF32 is off for the GPU run: with it the matmuls round to 10 mantissa bits and the check fails falsely."""
    cfg = DiTConfig(**TINY)
    cpu = build_dit(cfg, torch.device("cpu"), torch.float32, seed=3)
    inputs = dit_inputs(cfg, 3, 8, 12, torch.device("cpu"), torch.float32, seed=4)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode():
            ref = cpu(*inputs)
            other = cpu.to(device)(*(t.to(device) for t in inputs)).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
    rel = float((other - ref).norm() / ref.norm())
    return {"config": "tiny fp32, 2 speakers, latent 3×8×12", "tf32": False, "rel_l2": rel, "ok": rel <= 1e-5}


def section_compile(b: Bench, timeout_s: float, args: list[str]) -> dict:
    """`--compile` measured in a child process (a hang or a slow inductor cannot eat the other sections)."""
    b.drop_model()   # the child builds its own full-size DiT
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-child", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, timeout_s))
    except subprocess.TimeoutExpired:
        return {"error": f"compile did not finish within {timeout_s:.0f} s (the time left)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(COMPILE_MARK)]
    if proc.returncode or not lines:
        return {"error": f"child exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}"}
    return json.loads(lines[-1][len(COMPILE_MARK):])


def compile_child(b: Bench) -> dict:
    """Eager s/call, then the blocks compiled: first-call time, graphs compiled, s/call over repeated calls
    (graphs past one per block mean recompiles; past dynamo's cache limit a block silently runs eager)."""
    import torch._dynamo

    graphs: list[int] = []
    inner: str | Callable = "eager"
    if not b.smoke:
        from torch._inductor.compile_fx import compile_fx as inner

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward if inner == "eager" else inner(gm, example_inputs)

    eager = b.call_s(warmup=1, iters=1)
    torch._dynamo.reset()
    configure(b.model, b.device, compile_backend=counting, compile=True)
    start = time.perf_counter()
    b.call_s(warmup=0, iters=1)
    first = time.perf_counter() - start
    compiled = b.call_s(warmup=0, iters=2)
    return {"backend": "inductor" if not b.smoke else "eager (smoke)", "eager_s_per_call": round(eager, 4),
            "first_call_s": round(first, 2), "compile_s": round(max(0.0, first - compiled), 2),
            "graphs": len(graphs), "blocks": b.cfg.num_layers,
            "cache_size_limit": torch._dynamo.config.cache_size_limit,
            "s_per_call": round(compiled, 4), "speedup": round(eager / compiled, 3)}


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
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 45 s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"),
                    help="folder for gpu_check.json and gpu_check.md (default: benchmarks/out, git-ignored)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for everything (default 450; smoke 60)")
    ap.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    b = Bench(smoke)
    if args.compile_child:
        print(COMPILE_MARK + json.dumps(compile_child(b)), flush=True)
        return 0
    report = Report(args.deadline or (60.0 if smoke else 450.0))
    report.data["smoke"] = smoke
    quick = 1 if smoke else 0   # smoke: every section runs unless the machine is very slow

    report.run("env", lambda: section_env(b))
    report.run("dit", lambda: section_dit(b))
    report.run("vae", lambda: section_vae(b), needs_s=quick or 30)
    report.run("e2e", lambda: section_e2e(b))                  # never skipped
    report.run("turbo", lambda: section_turbo(b), needs_s=quick or 60)
    report.run("attention", lambda: section_attention(b), needs_s=quick or 45)
    report.run("fp8", lambda: section_fp8(b), needs_s=quick or 50)
    report.run("budget", lambda: section_budget(b), needs_s=quick or 90)
    report.run("agreement", lambda: section_agreement(b.device if not smoke else torch.device("cpu")), needs_s=1)
    child = ["--smoke"] if smoke else []
    report.run("compile", lambda: section_compile(b, report.left() - 5, child), needs_s=quick or 60)
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
