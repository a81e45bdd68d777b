"""The memory plan a user can read before starting: per component its bytes by storage dtype and where it
lives, the predicted peaks of a DiT step and of a VAE decode, and whether the job fits the budget.

Sizes come either from file headers (`plan_for_paths`, behind `pipeline.models.plan_from_files`: no weights are read, so a 40 GB models folder is
planned in milliseconds) or from loaded modules (`weights_of`, used at every job start). The decision itself
is `budget.decide_placement`; this module gathers its inputs and renders the result.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.layout import IGNORED_SUFFIXES, KNOWN_PREFIXES
from ..checkpoints.layout import SCALE_SUFFIXES as _SCALE_SUFFIXES
from ..checkpoints.reader import open_checkpoint
from ..loaders.dit import is_audio_key
from ..ops.parallel import guidance_layout
from ..ops.quants import packed_nbytes
from .budget import (GiB, PREFETCH_BLOCKS, RUNTIME_RESERVE_BYTES, DiTWeights, JobShape, Placement, ceil_gib,
                     decide_placement)

__all__ = ["ComponentMemory", "MemoryPlan", "plan_for_paths", "make_plan", "dit_weights_of", "module_bytes",
           "job_on_rank"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_BLOCK = re.compile(r"(?:^|[._])blocks[._](\d+)[._]")
_PREFIXES = KNOWN_PREFIXES + ("transformer.", "lora_unet_")   # + the wrappers of LoRA files
_DROPPED_SUFFIXES = IGNORED_SUFFIXES + ("scaled_fp8",)           # + the fp8 marker tensor
_LORA_FACTORS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight")
_ENCODERS = ("text_encoder", "clip_vision")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ComponentMemory:
    """One component: bytes by storage dtype once loaded, and where it lives during a job."""

    name: str
    bytes_by_dtype: dict[str, int]
    where: str = "resident"

    @property
    def total(self) -> int:
        return sum(self.bytes_by_dtype.values())


@dataclass
class MemoryPlan:
    """What `plan` prints and every job logs; `fits` False means the job is refused before model work."""

    device: str
    job: JobShape
    label: str
    components: list[ComponentMemory]
    placement: Placement
    visit_peaks: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    smallest_budget: int | None = None

    @property
    def fits(self) -> bool:
        return not self.reasons

    def text(self) -> str:
        p, j = self.placement, self.job
        budget = "unlimited (everything resident)" if p.budget is None else f"{p.budget / GiB:.1f} GiB"
        share = f" ({j.local_tokens} on this rank of {j.sequence_ranks})" if j.sequence_ranks > 1 else ""
        lines = [f"memory plan for {self.device}: {self.label}; window {j.width}x{j.height} px, {j.latent_frames} "
                 f"latent frames, {j.tokens} tokens{share}, {j.calls_per_step} model calls/step"
                 f"{', TeaCache' if j.teacache else ''}",
                 f"budget: {budget}"]
        for c in self.components:
            parts = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in sorted(c.bytes_by_dtype.items()) if v)
            lines.append(f"  {c.name:<13} {c.total / GiB:6.2f} GiB  {c.where:<40} ({parts or 'empty'})")
        batch = f"guidance batch {p.max_guidance_batch} of {j.calls_per_step}"
        lines.append(f"peak DiT step:   {p.dit_peak / GiB:6.2f} GiB ({batch})")
        tile = "whole frames" if p.vae_tile is None else \
            f"tiles {p.vae_tile[0]}x{p.vae_tile[1]} latent px, overlap {p.vae_tile[2]}"
        lines.append(f"peak VAE decode: {p.vae_peak / GiB:6.2f} GiB ({tile})")
        for name, peak in self.visit_peaks.items():
            lines.append(f"peak {name} visit: {peak / GiB:6.2f} GiB")
        if self.smallest_budget is not None:
            lines.append(f"smallest budget that fits: {ceil_gib(self.smallest_budget):.1f} GiB")
        lines.append("fits: yes" if self.fits else "fits: NO - " + "; ".join(self.reasons))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        p = self.placement
        return {
            "device": self.device, "label": self.label, "fits": self.fits, "reasons": list(self.reasons),
            "budget_bytes": p.budget, "job": vars(self.job).copy(),
            "components": [{"name": c.name, "bytes_by_dtype": c.bytes_by_dtype, "total_bytes": c.total,
                            "where": c.where} for c in self.components],
            "dit": {"blocks": p.num_blocks, "resident_blocks": p.resident_blocks, "streamed_blocks": list(p.streamed),
                    "prefetch": p.prefetch, "max_guidance_batch": p.max_guidance_batch, "peak_bytes": p.dit_peak},
            "vae": {"peak_bytes": p.vae_peak, "tile": list(p.vae_tile) if p.vae_tile else None},
            "visit_peak_bytes": dict(self.visit_peaks), "smallest_budget_bytes": self.smallest_budget,
        }


# ---------------------------------------------------------------------------------------------- sizes
def _canonical(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _stored(key: str, shape: torch.Size, dtype: torch.dtype, run_dtype: torch.dtype,
            keep_fp32: bool = False, qtype: int | None = None) -> tuple[str, int]:
    """(storage dtype name, bytes) of one file tensor once loaded (loaders' rules: fp8 and GGUF-quantised
    Linear weights stay packed, fp8 scales become float32 buffers, other floats take the run dtype, markers
    are dropped)."""
    n = shape.numel()
    if key.endswith(_DROPPED_SUFFIXES):
        return "", 0
    if qtype is not None and _packed_linear(key, shape):
        return "uint8", packed_nbytes(shape, qtype)
    if key.endswith(_SCALE_SUFFIXES):
        return "float32", 4 * n
    if dtype in _FP8 and len(shape) == 2:
        return _dtype_name(dtype), n
    if dtype.is_floating_point:
        target = torch.float32 if keep_fp32 else run_dtype
        return _dtype_name(target), n * target.itemsize
    return _dtype_name(dtype), n * dtype.itemsize


def _packed_linear(key: str, shape: torch.Size) -> bool:
    """A GGUF-quantised tensor the loader keeps packed: a Linear weight (other quantised tensors dequantise)."""
    return len(shape) == 2 and key.endswith(".weight")


def _header_tensors(path: Path | str) -> Iterable[tuple[str, torch.Size, torch.dtype, int | None]]:
    """(name, shape, dtype, GGUF quant type or None) of every tensor, from the header alone."""
    ckpt = open_checkpoint(path)
    packed_type = getattr(ckpt, "packed_type", lambda key: None)
    for key in ckpt:
        yield key, ckpt.shape(key), ckpt.dtype(key), packed_type(key)


def _file_bytes(path: Path | str, run_dtype: torch.dtype, only: str | None = None,
                keep_fp32: bool = False) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    tensors = list(_header_tensors(path))
    if only is not None and any(_canonical(k).startswith(only) for k, *_ in tensors):
        tensors = [t for t in tensors if _canonical(t[0]).startswith(only)]
    for key, shape, dtype, qtype in tensors:
        name, n = _stored(key, shape, dtype, run_dtype, keep_fp32, qtype)
        if n:
            out[name] += n
    return dict(out)


def _dit_from_files(dit: Path, patch: Path | None, loras: Iterable[Path], run_dtype: torch.dtype
                    ) -> tuple[DiTWeights, dict[str, int]]:
    """DiTWeights of base (+ audio patch, + unmerged LoRA factors) from headers alone."""
    chosen: dict[str, tuple[str, int, int, int]] = {}   # canonical -> (dtype name, bytes, fp8, GGUF elements)
    sources = [(dit, False)] + ([(patch, True)] if patch is not None else [])
    dim = ffn = 0
    for path, audio_only in sources:
        for key, shape, dtype, qtype in _header_tensors(path):
            name = _canonical(key)
            if audio_only and not is_audio_key(name):
                continue
            kind, n = _stored(name, shape, dtype, run_dtype, qtype=qtype)
            gguf = shape.numel() if qtype is not None and _packed_linear(name, shape) else 0
            chosen[name] = (kind, n, shape.numel() if dtype in _FP8 and len(shape) == 2 else 0, gguf)
            if name == "blocks.0.self_attn.q.weight":
                dim = shape[0]
            if name == "blocks.0.ffn.0.weight":
                ffn = shape[0]
    # LoRA factors stay as an unmerged low-rank path only on quantised (fp8, GGUF) weights; elsewhere they merge
    quantised = {k[: -len(".weight")].replace(".", "_"): k[: -len(".weight")] for k, v in chosen.items()
                 if k.endswith(".weight") and (v[2] or v[3])}
    for path in loras:
        for key, shape, dtype, _ in _header_tensors(path):
            suffix = next((s for s in _LORA_FACTORS if key.endswith(s)), None)
            layer = quantised.get(_canonical(key[: -len(suffix)]).replace(".", "_")) if suffix else None
            if layer is not None:
                kind, n = _stored(key, shape, dtype, run_dtype)
                chosen[f"{layer}{suffix}"] = (kind, n, 0, 0)
    return _summarise(((k, *v) for k, v in chosen.items()), dim, ffn)


def _summarise(items: Iterable[tuple[str, str, int, int, int]], dim: int, ffn: int, text_len: int = 512
               ) -> tuple[DiTWeights, dict[str, int]]:
    """items: (name, storage dtype name, bytes, fp8 Linear elements, GGUF Linear elements)."""
    blocks: dict[int, int] = defaultdict(int)
    other = largest_fp8 = largest_gguf = 0
    by_dtype: dict[str, int] = defaultdict(int)
    for name, kind, n, fp8_elems, gguf_elems in items:
        if not n:
            continue
        by_dtype[kind] += n
        largest_fp8 = max(largest_fp8, fp8_elems)
        largest_gguf = max(largest_gguf, gguf_elems)
        m = _BLOCK.search(name)
        if m:
            blocks[int(m.group(1))] += n
        else:
            other += n
    count = max(blocks) + 1 if blocks else 0
    weights = DiTWeights(dim=dim, ffn_dim=ffn, text_len=text_len,
                         block_bytes=tuple(blocks.get(i, 0) for i in range(count)), other_bytes=other,
                         largest_fp8_linear=largest_fp8, largest_gguf_linear=largest_gguf)
    return weights, dict(by_dtype)


def module_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes by dtype of every parameter and buffer of a loaded module."""
    out: dict[str, int] = defaultdict(int)
    for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
        out[_dtype_name(t.dtype)] += t.numel() * t.element_size()
    return dict(out)


def dit_weights_of(dit: nn.Module) -> tuple[DiTWeights, dict[str, int]]:
    """DiTWeights of a loaded DiT (call before streaming is installed: streamed blocks hold placeholders)."""
    packed = {f"{name}.weight": m.out_features * m.in_features for name, m in dit.named_modules()
              if getattr(m, "gguf_type", None) is not None}
    e4m3 = {f"{name}.weight" for name, m in dit.named_modules() if getattr(m, "fp8_matmul", False)}

    def items():
        for group in (dit.named_parameters(), dit.named_buffers()):
            for name, t in group:
                if t is None:
                    continue
                fp8 = t.numel() if t.dtype in _FP8 and t.dim() == 2 and name not in e4m3 else 0
                yield name, _dtype_name(t.dtype), t.numel() * t.element_size(), fp8, packed.get(name, 0)
    c = dit.config
    weights, by_dtype = _summarise(items(), c.dim, c.ffn_dim, c.text_len)
    return replace(weights, fp8_matmul=bool(e4m3)), by_dtype


# ---------------------------------------------------------------------------------------------- plan
def job_on_rank(job: JobShape, world_size: int, guidance_parallel: bool = True, num_heads: int | None = None
                ) -> JobShape:
    """The share of `job` one rank of a `world_size` run computes (ops/parallel.py `guidance_layout`): the
    calls of its guidance group, each on 1/P of the tokens. A rank plans for this, not the whole window."""
    if world_size <= 1:
        return job
    groups, size = guidance_layout(world_size, max(1, job.calls_per_step), guidance_parallel, num_heads)
    return replace(job, calls_per_step=-(-job.calls_per_step // groups), sequence_ranks=size)


def make_plan(dit: tuple[DiTWeights, dict[str, int]], others: dict[str, dict[str, int]], job: JobShape,
              budget: int | None, *, device: str, label: str, act_bytes: int, vae_channels: int = 96,
              batch_guidance: bool = True) -> MemoryPlan:
    """Decide placement and render it. `others`: bytes by dtype of vae, text_encoder, clip_vision, wav2vec2
    (the encoders visit the device one at a time; wav2vec2 stays on the CPU)."""
    weights, dit_dtypes = dit
    vae_bytes = sum(others.get("vae", {}).values())
    prefetch = PREFETCH_BLOCKS if device.startswith("cuda") else 0   # the CPU copies each block when called
    placement = decide_placement(weights, job, budget, act_bytes=act_bytes, vae_bytes=vae_bytes,
                                 vae_channels=vae_channels, batch_guidance=batch_guidance, prefetch=prefetch)
    reasons = list(placement.reasons)
    where = "resident" if not placement.streaming else \
        f"{placement.resident_blocks} blocks resident, {len(placement.streamed)} streamed"
    components = [ComponentMemory("dit", dit_dtypes, where)]
    visit_peaks: dict[str, int] = {}
    for name in ("vae", *_ENCODERS, "wav2vec2"):
        if name not in others:
            continue
        comp = ComponentMemory(name, others[name], "resident" if name == "vae" else "visits")
        if name == "wav2vec2":
            comp.where = "cpu"
        components.append(comp)
        if name in _ENCODERS:
            # the encoder visits with the DiT stepped aside to the host when needed: VAE + encoder + reserve
            visit_peaks[name] = vae_bytes + comp.total + RUNTIME_RESERVE_BYTES
            if budget is not None and visit_peaks[name] > budget:
                reasons.append(f"the {name.replace('_', ' ')} needs {visit_peaks[name] / GiB:.1f} GiB to visit "
                               f"(use a smaller file, e.g. its fp8 version)")
    smallest = None
    if budget is not None:
        smallest = _smallest_budget(weights, job, act_bytes, vae_bytes, vae_channels, visit_peaks, prefetch)
    return MemoryPlan(device, job, label, components, placement, visit_peaks, reasons, smallest)


def _smallest_budget(weights: DiTWeights, job: JobShape, act_bytes: int, vae_bytes: int, vae_channels: int,
                     visit_peaks: dict[str, int], prefetch: int) -> int:
    """The least budget (to 0.1 GiB) that fits: bisection over decide_placement."""
    lo, hi = 0, int(weights.total_bytes * 2 + 64 * GiB)
    while hi - lo > GiB // 10:
        mid = (lo + hi) // 2
        p = decide_placement(weights, job, mid, act_bytes=act_bytes, vae_bytes=vae_bytes,
                             vae_channels=vae_channels, batch_guidance=False, prefetch=prefetch)
        lo, hi = (lo, mid) if p.fits else (mid, hi)
    return max([hi, *visit_peaks.values()])


def plan_for_paths(paths: Any, job: JobShape, budget: int | None, *, device: str = "cuda",
                   dtype: torch.dtype = torch.bfloat16, batch_guidance: bool = True, label: str = "",
                   fp8_matmul: bool = False) -> MemoryPlan:
    """The plan of `job` from the headers of resolved model files (`paths`: a `pipeline.model_files.ModelPaths`;
    no weights are read). The pipeline resolves the files and the job (`pipeline.models.plan_from_files`).
    `fp8_matmul`: the fp8 Linears will multiply in e4m3 (runtime/kernels.py), so none is dequantised."""
    dit = _dit_from_files(paths.dit, paths.patch, [p for p, _ in paths.loras], dtype)
    if fp8_matmul and dit[0].largest_fp8_linear:
        dit = replace(dit[0], largest_fp8_linear=0, fp8_matmul=True), dit[1]
    others = {
        "vae": _file_bytes(paths.vae, torch.float32),
        "text_encoder": _file_bytes(paths.text_encoder, dtype),
        "clip_vision": _file_bytes(paths.clip_vision, dtype, only="visual."),
        "wav2vec2": _file_bytes(paths.wav2vec2, torch.float32),
    }
    return make_plan(dit, others, job, budget, device=device, label=label, act_bytes=dtype.itemsize,
                     vae_channels=_vae_channels(paths.vae), batch_guidance=batch_guidance)


def _vae_channels(path: Path) -> int:
    """Width of the VAE decoder's last stage (its output conv's input channels), 96 for Wan2.1."""
    for key, shape, *_ in _header_tensors(path):
        if _canonical(key) == "decoder.head.2.weight" and len(shape) >= 2:
            return int(shape[1])
    return 96
