"""Census of one full-size DiT call and one VAE window decode on fake tensors, and a modelled H100 roofline.

    python benchmarks/census.py                    # 14B config, 480p (21×80×80 latent = 33,600 tokens), 2 speakers
    python benchmarks/census.py --json             # one JSON object (fast_dit_call_s, fast_s_per_video_second, rows)
    python benchmarks/census.py --resolution 720p  # 21×90×160 latent
    python benchmarks/census.py --smoke --json     # tiny shapes: checks that the script works (seconds)

Every tensor is a fake tensor (torch's FakeTensorMode: shapes, dtypes and devices, no data, no memory; on the
CPU device, see DEVICE), so the full 14B block runs here in seconds on a CPU. A TorchDispatchMode records each aten op: FLOPs (torch's
flop counter formulas), bytes read and written, the source line in this package that issued it, whether it ran
inside a DiT block or a fused float32 island (`ops.fused`), and the bytes alive (activation peak, read against
the memory plan's estimate from runtime/budget.py). Each configuration is then *modelled*, never measured:
every kernel takes max(FLOPs / compute ceiling, bytes / memory bandwidth), with

- eager: every aten op one kernel;
- eager + fusions: each `ops.fused` island one kernel (reads its inputs once, writes its output once);
- compiled: every run of ops between two matmul/attention/convolution kernels one kernel (inductor's fusion,
  optimistic), reading what was made before the run and writing what is used after it.

Attention FLOPs run at the backend's throughput (ATTENTION_RATE). Only one block is traced; a DiT call is the
non-block part once plus the block part × num_layers. A window = (DiT calls per step × steps) DiT calls + one
VAE decode of its 81 frames (the encoders' per-window work is not counted); it advances 72 new frames (25 fps).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import FULL_14B  # noqa: E402

from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT  # noqa: E402
from infinitetalk.models.layers import Linear  # noqa: E402
from infinitetalk.models.vae import CausalState, VAEConfig, WanVAE  # noqa: E402
from infinitetalk.ops import attention as attention_ops, fused  # noqa: E402
from infinitetalk.pipeline.request import PRESETS  # noqa: E402
from infinitetalk.pipeline.sampler import Guidance  # noqa: E402
from infinitetalk.pipeline.windows import FRAME_NUM, MOTION_FRAMES  # noqa: E402
from infinitetalk.runtime.budget import DiTWeights, dit_activation_bytes, vae_decode_bytes  # noqa: E402

# ---- ceilings (one H100 SXM; written first in every output) --------------------------------------------
CEILINGS = {"bf16_flops": 798e12, "fp8_flops": 1596e12, "tf32_flops": 399e12, "fp32_flops": 67e12,
            "bytes_per_s": 3.0e12}
# Attention throughput (FLOP/s of the q·kᵀ and p·v products) per backend on sm90, head dim 128, long sequences.
ATTENTION_RATE = {"flash2 (SDPA default)": 360e12, "cudnn (SDPA)": 576e12, "fa3": 640e12, "sage": 720e12}
AUTO_ATTENTION = "cudnn (SDPA)"   # what attention=auto picks on sm90 (ops.attention)
# Fake CPU tensors: a CPU-only PyTorch gives fake CUDA tensors, but its Python indexing and .contiguous()
# open a CUDA device guard and fail; the ops and their costs are the same (attention is the fused GPU op).
DEVICE = "cpu"
MIN_KERNEL_S = 2e-6               # a kernel never takes less (launch and tail)
FPS = 25

SMOKE = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, image_dim=32, intermediate_dim=16,
             output_dim=32, context_tokens=4, audio_layers=2, audio_channels=16)
LATENTS = {"480p": (21, 80, 80), "720p": (21, 90, 160), "smoke": (3, 8, 8)}
ATTENTION = -1.0                  # an attention op's rate: the backend's, chosen when modelling
HEAVY = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "_scaled_dot_product_flash_attention"}


# ---- the trace --------------------------------------------------------------------------------------------
@dataclass
class Op:
    """One aten op: `reads`/`writes` are (storage id, bytes) pairs."""

    name: str
    flops: int
    reads: tuple[tuple[int, int], ...]
    writes: tuple[tuple[int, int], ...]
    line: str
    rate: float            # FLOP/s ceiling of this op's compute
    in_block: bool
    island: int | None     # index of the fused-island call it ran in

    @property
    def nbytes(self) -> int:
        return sum(b for _, b in self.reads) + sum(b for _, b in self.writes)

    @property
    def heavy(self) -> bool:
        return self.name in HEAVY


def _source_line() -> str:
    """The innermost frame in this package (outside this script) that issued the op."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "infinitetalk" in path and "benchmarks" not in path:
            rel = path[path.rindex("infinitetalk"):]
            return f"{rel}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "(outside the package)"


class Census(TorchDispatchMode):
    """Records ops and the live bytes of every storage made while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.ids = WeakIdKeyDictionary()
        self.counter = itertools.count(1)
        self.live = self.peak = 0
        self.in_block = False
        self.island: int | None = None
        self.islands = 0

    def _sid(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        sid = self.ids.get(storage)
        if sid is None:
            sid = self.ids[storage] = next(self.counter)
        return sid

    def _bytes(self, t: torch.Tensor) -> int:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())

    def _rate(self, name: str, args) -> float:
        if name == "_scaled_dot_product_flash_attention":
            return ATTENTION
        if name == "_scaled_mm":
            return CEILINGS["fp8_flops"]
        dtype = args[0].dtype if args and isinstance(args[0], torch.Tensor) else torch.float32
        if dtype in (torch.bfloat16, torch.float16):
            return CEILINGS["bf16_flops"]
        return CEILINGS["tf32_flops"] if name in HEAVY else CEILINGS["fp32_flops"]

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if func.namespace == "prim":
            return out
        name = func._overloadpacket.__name__
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        aliasing = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if aliasing:  # a view: no kernel, no bytes
            return out
        for t in outputs:
            storage = t.untyped_storage()
            if storage not in self.ids:
                self._sid(t)
                nbytes = storage.nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, nbytes)
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        reads = {self._sid(t): self._bytes(t) for t in inputs}
        writes = {self._sid(t): self._bytes(t) for t in outputs}
        self.ops.append(Op(name, int(flops), tuple(reads.items()), tuple(writes.items()), _source_line(),
                           self._rate(name, inputs), self.in_block, self.island))
        return out

    def observe_island(self, island, run, args):
        """`ops.fused` observer: tags the ops of one island call."""
        self.island, self.islands = self.islands, self.islands + 1
        try:
            return run(*args)
        finally:
            self.island = None


def _fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fused attention op as a GPU runs it (SDPA on fake tensors would decompose into the math path)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


# ---- kernels under each execution model -------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    flops: int
    nbytes: int
    rate: float

    def seconds(self, attention_rate: float = ATTENTION_RATE[AUTO_ATTENTION]) -> float:
        rate = attention_rate if self.rate == ATTENTION else self.rate
        return max(self.flops / rate, self.nbytes / CEILINGS["bytes_per_s"], MIN_KERNEL_S)


def _group(ops: list[Op], later_reads: dict[int, int], index: list[int]) -> Kernel:
    """Ops fused into one kernel: reads what was made outside, writes what is read after the last op."""
    made, reads, writes = set(), {}, {}
    for op in ops:
        for sid, b in op.reads:
            if sid not in made:
                reads.setdefault(sid, b)
        for sid, b in op.writes:
            made.add(sid)
            writes[sid] = b
    last = index[-1]
    kept = sum(b for sid, b in writes.items() if later_reads.get(sid, last + 1) > last)
    flops = sum(op.flops for op in ops)
    rate = min((op.rate for op in ops if op.rate > 0), default=CEILINGS["fp32_flops"])
    return Kernel(flops, sum(reads.values()) + kept, rate)


def _last_reads(ops: list[Op]) -> dict[int, int]:
    """storage id -> index of the last op reading it (storages never read again are kept: outputs)."""
    last = {}
    for i, op in enumerate(ops):
        for sid, _ in op.reads:
            last[sid] = i
    for i, op in enumerate(ops):
        for sid, _ in op.writes:
            last.setdefault(sid, len(ops))  # made and never read in the trace: the call's output
    return last


def kernels(ops: list[Op], mode: str) -> list[tuple[list[int], Kernel]]:
    """The kernels (with the op indices in each) under `mode`: eager, fused (islands) or compiled."""
    last = _last_reads(ops)
    out: list[tuple[list[int], Kernel]] = []
    run: list[int] = []

    def close():
        if run:
            out.append((list(run), _group([ops[i] for i in run], last, run)))
            run.clear()

    for i, op in enumerate(ops):
        key = (op.island if mode == "fused" else (not op.heavy) if mode == "compiled" else None)
        if key is None or key is False:
            close()
            out.append(([i], Kernel(op.flops, op.nbytes, op.rate)))
            continue
        if run and (mode == "fused" and ops[run[-1]].island != op.island):
            close()
        run.append(i)
    close()
    return out


def seconds(ops: list[Op], mode: str, attention_rate: float = ATTENTION_RATE[AUTO_ATTENTION]) -> float:
    return sum(k.seconds(attention_rate) for _, k in kernels(ops, mode))


# ---- runs --------------------------------------------------------------------------------------------------
def _fill(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Meta parameters and buffers -> fake tensors on DEVICE (floats as `dtype`), in place."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    new = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=DEVICE)
                    table[name] = torch.nn.Parameter(new, requires_grad=False) if table is module._parameters else new


def _dit(cfg: DiTConfig, weights: str) -> InfiniteTalkDiT:
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg, compute_dtype=torch.bfloat16)
    _fill(model, torch.bfloat16)
    if weights != "bf16":
        for module in model.blocks.modules():
            if isinstance(module, Linear):
                module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
                module.weight_scale = torch.ones((), dtype=torch.float32)
                module.fp8_matmul = weights == "fp8 _scaled_mm"
    return model


def trace_dit(cfg: DiTConfig, latent: tuple[int, int, int], weights: str, persons: int = 2
              ) -> tuple[Census, int]:
    """One DiT call with one block (cfg.num_layers = 1) on fake tensors -> (census, DiT call activation
    peak in bytes)."""
    one = replace(cfg, num_layers=1)
    census = Census()
    t, h, w = latent
    with FakeTensorMode(), torch.no_grad():
        model = _dit(one, weights)
        x = torch.empty(one.out_dim, t, h, w, device=DEVICE)
        y = torch.empty(one.in_dim - one.out_dim, t, h, w, device=DEVICE)
        context = torch.empty(one.text_len, one.text_dim, device=DEVICE)
        clip = torch.empty(1, 257, one.image_dim, device=DEVICE)
        audio = torch.empty(persons, one.vae_scale * (t - 1) + 1, one.audio_window, one.audio_layers,
                            one.audio_channels, device=DEVICE)
        masks = torch.empty(3, h, w, device=DEVICE)
        block = model.blocks[0]
        block.register_forward_pre_hook(lambda *_: setattr(census, "in_block", True))
        block.register_forward_hook(lambda *_: setattr(census, "in_block", False))
        saved = dict(attention_ops._resolved)
        attention_ops._resolved["sdpa"] = _fake_attention
        try:
            with census, fused.observe(census.observe_island):
                model(x, torch.tensor([500.0]), context, clip, y, audio, masks)
        finally:
            attention_ops._resolved.clear()
            attention_ops._resolved.update(saved)
    return census, census.peak


def trace_vae(latent: tuple[int, int, int]) -> tuple[Census, int]:
    """One window decode (float32, untiled) -> (census, peak bytes while decoding)."""
    census = Census()
    t, h, w = latent
    with FakeTensorMode(), torch.no_grad():
        with torch.device("meta"):
            vae = WanVAE(VAEConfig())
        _fill(vae, torch.float32)
        z = torch.empty(1, vae.config.z_dim, t, h, w, device=DEVICE)  # after the latent statistics
        with census:
            for frames in vae._decode_frames(vae.conv2(z), CausalState()):
                frames.float().clamp_(-1.0, 1.0)
    return census, census.peak


def dit_call_seconds(census: Census, layers: int, mode: str, attention: str) -> float:
    block = [op for op in census.ops if op.in_block]
    rest = [op for op in census.ops if not op.in_block]
    rate = ATTENTION_RATE[attention]
    return seconds(rest, mode, rate) + layers * seconds(block, mode, rate)


def calls_per_window() -> dict[str, int]:
    """DiT calls per window by preset: steps x the guidance's calls per step (turbo: 4 x 1)."""
    return {name: p.steps * Guidance(p.text_guidance, p.audio_guidance).calls_per_step
            for name, p in PRESETS.items()}


def _per_line(ops: list[Op], scale: int) -> list[dict]:
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for op in ops:
        r = rows[op.line]
        r[0] += op.flops * scale
        r[1] += op.nbytes * scale
        r[2] += Kernel(op.flops, op.nbytes, op.rate).seconds() * scale
    return [{"line": k, "flops": v[0], "bytes": v[1], "eager_s": v[2]}
            for k, v in sorted(rows.items(), key=lambda kv: -kv[1][2])]


def _per_op(ops: list[Op], scale: int) -> list[dict]:
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0])
    for op in ops:
        r = rows[op.name]
        r[0] += op.flops * scale
        r[1] += op.nbytes * scale
        r[2] += Kernel(op.flops, op.nbytes, op.rate).seconds() * scale
        r[3] += scale
    return [{"op": k, "count": v[3], "flops": v[0], "bytes": v[1], "eager_s": v[2]}
            for k, v in sorted(rows.items(), key=lambda kv: -kv[1][2])]


def run(resolution: str, smoke: bool) -> dict:
    started = time.perf_counter()
    cfg = DiTConfig(**(SMOKE if smoke else FULL_14B))
    latent = LATENTS["smoke" if smoke else resolution]
    vae_latent = (2, 8, 8) if smoke else latent
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    vae, vae_peak = trace_vae(vae_latent)
    vae_s = seconds(vae.ops, "eager")   # the package never compiles the VAE
    calls = calls_per_window()
    new_seconds = (FRAME_NUM - MOTION_FRAMES) / FPS
    rows, traces = [], {}
    for weights in ("bf16", "fp8 dequantised", "fp8 _scaled_mm"):
        census, peak = trace_dit(cfg, latent, weights)
        traces[weights] = census
        plan_w = DiTWeights(cfg.dim, cfg.ffn_dim, cfg.text_len, (0,) * cfg.num_layers, 0,
                            largest_fp8_linear=cfg.ffn_dim * cfg.dim if weights == "fp8 dequantised" else 0,
                            fp8_matmul=weights == "fp8 _scaled_mm")
        plan = dit_activation_bytes(plan_w, tokens, 1, 2)
        for mode in ("eager", "fused", "compiled"):
            for attention in ATTENTION_RATE:
                call = dit_call_seconds(census, cfg.num_layers, mode, attention)
                per_vs = {p: (n * call + vae_s) / new_seconds for p, n in calls.items()}
                rows.append({"weights": weights, "execution": mode, "attention": attention, "dit_call_s": call,
                             "activation_peak_bytes": peak, "plan_activation_bytes": plan,
                             **{f"{p}_s_per_video_second": v for p, v in per_vs.items()}})
    census = traces["bf16"]
    block_flops = sum(op.flops for op in census.ops if op.in_block)
    call_flops = sum(op.flops for op in census.ops) + (cfg.num_layers - 1) * block_flops

    def pick(weights: str, mode: str, attention: str = AUTO_ATTENTION) -> dict:
        return next(r for r in rows if (r["weights"], r["execution"], r["attention"]) == (weights, mode, attention))

    default = pick("bf16", "fused")
    vae_plan = vae_decode_bytes(vae_latent[1] * 8, vae_latent[2] * 8, 96)   # one latent frame, untiled
    block_ops = [op for op in census.ops if op.in_block]
    return {
        "modelled": True,
        "ceilings": CEILINGS, "attention_rate": ATTENTION_RATE,
        "config": {"resolution": "smoke" if smoke else resolution, "latent": latent, "tokens": tokens,
                   "dim": cfg.dim, "layers": cfg.num_layers, "persons": 2, "calls_per_window": calls,
                   "new_video_seconds_per_window": new_seconds},
        "default": {"weights": "bf16", "execution": "fused", "attention": AUTO_ATTENTION},
        "fast_dit_call_s": default["dit_call_s"],
        "fast_s_per_video_second": default["fast_s_per_video_second"],
        "turbo_s_per_video_second": default["turbo_s_per_video_second"],
        "quality_s_per_video_second": default["quality_s_per_video_second"],
        "fp8_fused_dit_call_s": pick("fp8 _scaled_mm", "fused")["dit_call_s"],
        "dit_call_flops": call_flops,
        "vae_window_decode_s": vae_s,
        "vae": {"flops": sum(op.flops for op in vae.ops), "bytes": sum(op.nbytes for op in vae.ops),
                "peak_bytes": vae_peak, "plan_frame_bytes": vae_plan},
        "plan_vs_measured": {   # activation peaks: the fake-tensor census against runtime/budget.py's estimate
            **{f"dit {w}": {"measured_bytes": pick(w, "fused")["activation_peak_bytes"],
                            "plan_bytes": pick(w, "fused")["plan_activation_bytes"]} for w in traces},
            "vae decode": {"measured_bytes": vae_peak, "plan_bytes": vae_plan}},
        "rows": rows,
        "block_per_op": _per_op(block_ops, 1)[:20],
        "block_per_line": _per_line(block_ops, 1)[:20],
        "census_seconds": time.perf_counter() - started,
    }


def _shown(row: dict) -> bool:
    """Table rows: every configuration with auto attention; for bf16 also every backend fused, and the eager
    FlashAttention-2 call that ran before issue 22 (the JSON has every row)."""
    if row["attention"] == AUTO_ATTENTION:
        return True
    return row["weights"] == "bf16" and (row["execution"] == "fused" or (
        row["execution"] == "eager" and row["attention"].startswith("flash2")))


def _table(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"MODELLED (roofline on fake tensors, not measured) — ceilings: {c['bf16_flops'] / 1e12:.0f} TFLOP/s "
             f"bf16, {c['fp8_flops'] / 1e12:.0f} fp8, {c['tf32_flops'] / 1e12:.0f} tf32, "
             f"{c['bytes_per_s'] / 1e12:.1f} TB/s",
             f"config: {result['config']}",
             f"DiT call: {result['dit_call_flops'] / 1e15:.3f} PFLOP; VAE window decode "
             f"{result['vae']['flops'] / 1e15:.3f} PFLOP, {result['vae']['bytes'] / 1e12:.2f} TB, "
             f"{result['vae_window_decode_s']:.2f} s (eager)",
             "",
             "| weights | execution | attention | s / DiT call | activation peak / plan (GiB) | quality | fast | "
             "turbo (s / video-s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if not _shown(r):
            continue
        lines.append(f"| {r['weights']} | {r['execution']} | {r['attention']} | {r['dit_call_s']:.2f} | "
                     f"{r['activation_peak_bytes'] / 2**30:.1f} / {r['plan_activation_bytes'] / 2**30:.1f} | "
                     f"{r['quality_s_per_video_second']:.0f} | {r['fast_s_per_video_second']:.1f} | "
                     f"{r['turbo_s_per_video_second']:.1f} |")
    lines += ["", "activation peak, measured (fake tensors) / plan (runtime/budget.py):"]
    for name, r in result["plan_vs_measured"].items():
        ratio = r["measured_bytes"] / r["plan_bytes"]
        lines.append(f"  {name}: {r['measured_bytes'] / 2**30:.2f} / {r['plan_bytes'] / 2**30:.2f} GiB "
                     f"({ratio:.2f}×{', OVER THE PLAN' if ratio > 1 else ''})")
    lines += ["", "one block, eager, by source line (top 12):"]
    for r in result["block_per_line"][:12]:
        lines.append(f"  {r['eager_s'] * 1e3:8.2f} ms  {r['flops'] / 1e12:8.2f} TFLOP  {r['bytes'] / 1e9:7.2f} GB  "
                     f"{r['line']}")
    lines += ["", "one block, eager, by aten op (top 10):"]
    for r in result["block_per_op"][:10]:
        lines.append(f"  {r['eager_s'] * 1e3:8.2f} ms  ×{r['count']:<4} {r['flops'] / 1e12:8.2f} TFLOP  "
                     f"{r['bytes'] / 1e9:7.2f} GB  {r['op']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", choices=("480p", "720p"), default="480p")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, numbers meaningless)")
    args = ap.parse_args(argv)
    result = run(args.resolution, args.smoke)
    print(json.dumps(result, indent=1) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
