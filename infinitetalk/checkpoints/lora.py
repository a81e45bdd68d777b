"""LoRA merging at load time, lazily, one tensor at a time.

`apply_loras(tensors, scales, loras)` wraps a canonical view: reading a weight that a LoRA targets
returns `W + sum(strength * delta)` computed in float32, so merging never holds a second copy of the
model. Accepted key styles (those of the lightx2v / FusionX distill LoRAs and common trainers):

- prefixes `diffusion_model.` (lightx2v, MeiGen), `model.diffusion_model.`, `transformer.`, none, and
  kohya's `lora_unet_<module path with '_' for '.'>`;
- `<m>.lora_down.weight` + `<m>.lora_up.weight` (or PEFT `lora_A`/`lora_B`), optional `<m>.alpha`:
  delta = up @ down * alpha / rank (ComfyUI's convention; the MeiGen reference ignores alpha, which is
  the same whenever alpha == rank or alpha is absent);
- `<m>.diff`: full delta of `<m>.weight` (or of the parameter `<m>` itself, e.g. a modulation table);
- `<m>.diff_b`: delta of `<m>.bias`.
`<block>.diff_m` (modulation deltas in some lightx2v files) is skipped, as both ComfyUI and the MeiGen
reference skip it.

Quantised weights (fp8, GGUF) stay quantised: their lora_down/lora_up pairs are not merged but kept as
an unmerged low-rank path `x·downᵀ·upᵀ` in the compute dtype (`attach_low_rank` puts it on the model's
Linear layers after loading; bf16 error vs the bf16 merge, a few % extra bytes at rank 32–64, see
docs/model-files.md). Float weights are merged (no cost per step). A `diff` (full delta) on a quantised
weight cannot stay low-rank: that layer is dequantised and merged, and its scale dropped.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .lazy import LazyTensors, dtype_of, packed_type_of, shape_of
from .materialize import FP8_DTYPES
from ..models.layers import Linear
from ..errors import CheckpointError
from .reader import Checkpoint, open_checkpoint

__all__ = ["apply_loras", "attach_low_rank", "LoraMergedView", "is_lora_key"]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_KOHYA_PREFIX = "lora_unet_"
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))
_SINGLE = (".diff_b", ".diff")
_SKIPPED = (".diff_m",)
_UNSUPPORTED = {".dora_scale": "DoRA", ".lora_mid.weight": "LoCon/Tucker (lora_mid)", ".hada_w1_a": "LoHa",
                ".lokr_w1": "LoKr"}


def is_lora_key(key: str) -> bool:
    """True for a tensor name that only LoRA files have."""
    return (key.startswith(_KOHYA_PREFIX) or any(key.endswith(s) for pair in _PAIRS for s in pair)
            or key.endswith(_SINGLE + _SKIPPED + (".alpha",)))


@dataclass
class _Term:
    strength: float
    ckpt: Checkpoint
    kind: str  # "lora" | "diff"
    keys: tuple[str, ...]  # (down, up) or (diff,)
    alpha_key: str | None = None

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if self.kind == "diff":
            return self.ckpt[self.keys[0]].to(device=device, dtype=torch.float32).reshape(shape)
        down = self.ckpt[self.keys[0]].to(device=device, dtype=torch.float32)
        up = self.ckpt[self.keys[1]].to(device=device, dtype=torch.float32)
        d = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        return d * self.alpha_factor(down.shape[0])

    def alpha_factor(self, rank: int) -> float:
        """alpha / rank (1 without an alpha)."""
        if self.alpha_key is None:
            return 1.0
        return float(self.ckpt[self.alpha_key].to(torch.float32).reshape(-1)[0]) / rank

    def factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(down `[r, in]`, strength·alpha/rank·up `[out, r]`) in float32, for the unmerged path."""
        down = self.ckpt[self.keys[0]].to(device=device, dtype=torch.float32).flatten(1)
        up = self.ckpt[self.keys[1]].to(device=device, dtype=torch.float32).flatten(1)
        return down, up * (self.strength * self.alpha_factor(down.shape[0]))


class LoraMergedView(LazyTensors):
    """The base tensors with LoRA deltas added on read (float32 math, result in `dtype`)."""

    def __init__(self, base: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
                 terms: dict[str, list[_Term]], dtype: torch.dtype, kept_scales: Mapping[str, torch.Tensor],
                 device: torch.device, low_rank: dict[str, list[_Term]] | None = None):
        super().__init__(base)  # reading the index gives the stored tensor the deltas are added to
        self.base = base
        self.low_rank = dict(low_rank or {})
        self.device = device
        self._scales = scales
        self._kept = dict(kept_scales)
        self.terms = terms
        self.out_dtype = dtype

    def _load(self, key: str, t: torch.Tensor) -> torch.Tensor:
        terms = self.terms.get(key)
        if not terms:
            return t
        # fp8 payloads dequantise here (scale 1 when the file has none)
        w = t.to(device=self.device, dtype=torch.float32, copy=True)
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is not None and layer in self._scales:
            w.mul_(self._scales[layer].to(device=self.device, dtype=torch.float32))
        for term in terms:
            w.add_(term.delta(w.shape, self.device), alpha=term.strength)
        return w.to(self.out_dtype)

    def shape(self, key: str) -> torch.Size:
        return shape_of(self.base, key)

    def dtype(self, key: str) -> torch.dtype:
        return self.out_dtype if key in self.terms else dtype_of(self.base, key)

    def packed_type(self, key: str) -> int | None:
        return None if key in self.terms else packed_type_of(self.base, key)

    def packed(self, key: str) -> torch.Tensor:
        return self.base.packed(key)

    def scales(self) -> dict[str, torch.Tensor]:
        """fp8 scales of the layers that stay fp8 (merged layers are no longer fp8)."""
        return dict(self._kept)

    def low_rank_paths(self, dtype: torch.dtype, device: torch.device | str
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (down `[r, in]`, up `[out, r]`) in `dtype` on `device`, several LoRAs stacked along r."""
        out = {}
        for target, terms in self.low_rank.items():
            pairs = [t.factors(self.device) for t in terms]
            down = torch.cat([d for d, _ in pairs], dim=0)
            up = torch.cat([u for _, u in pairs], dim=1)
            out[target[: -len(".weight")]] = (down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype))
        return out

    def __getattr__(self, name: str):
        # path / metadata of the wrapped view stay reachable
        if name in ("_index", "base", "_scales", "_kept", "terms", "out_dtype", "device", "low_rank"):
            raise AttributeError(name)
        return getattr(self.base, name)


def _module_of(key: str, underscore_map: dict[str, str]) -> tuple[str | None, str]:
    """(canonical module path or None, suffix) of a LoRA key."""
    suffix = next((s for pair in _PAIRS for s in pair if key.endswith(s)), None)
    if suffix is None:
        suffix = next((s for s in _SINGLE + _SKIPPED + (".alpha",) if key.endswith(s)), None)
    if suffix is None:
        return None, ""
    module = key[: -len(suffix)]
    if module.startswith(_KOHYA_PREFIX):
        return underscore_map.get(module[len(_KOHYA_PREFIX):], module), suffix
    for p in _PREFIXES:
        if module.startswith(p):
            return module[len(p):], suffix
    return module, suffix


def _open_lora(path: Path) -> Checkpoint:
    ckpt = open_checkpoint(path)
    for key in ckpt:
        for suffix, name in _UNSUPPORTED.items():
            if key.endswith(suffix):
                raise CheckpointError(path, f"{name} LoRAs are not supported (key {key!r}); use a plain LoRA "
                                      "(lora_down/lora_up, diff, diff_b)")
    return ckpt


def _collect(path: Path, ckpt: Checkpoint, strength: float, tensors: Mapping[str, torch.Tensor],
             underscore_map: dict[str, str], terms: dict[str, list[_Term]]) -> None:
    groups: dict[str, dict[str, str]] = {}
    unknown_form: list[str] = []
    for key in ckpt:
        module, suffix = _module_of(key, underscore_map)
        if module is None:
            unknown_form.append(key)
        elif suffix not in _SKIPPED:
            groups.setdefault(module, {})[suffix] = key
    if unknown_form:
        raise CheckpointError(path, f"not a LoRA file (or an unsupported LoRA style): {len(unknown_form)} key(s) "
                              f"are not lora_down/lora_up/alpha/diff/diff_b, e.g. {', '.join(unknown_form[:3])}")
    if not groups:
        raise CheckpointError(path, "LoRA file holds no LoRA tensors")
    missing: list[str] = []
    mismatched: list[str] = []
    found: list[tuple[str, _Term]] = []
    for module, parts in sorted(groups.items()):
        pair = next((p for p in _PAIRS if p[0] in parts or p[1] in parts), None)
        if pair is not None:
            if pair[0] not in parts or pair[1] not in parts:
                raise CheckpointError(path, f"LoRA for {module!r} has only one of {pair[0][1:]} / {pair[1][1:]}")
            target = module + ".weight"
            down_shape, up_shape = ckpt.shape(parts[pair[0]]), ckpt.shape(parts[pair[1]])
            term = _Term(strength, ckpt, "lora", (parts[pair[0]], parts[pair[1]]), parts.get(".alpha"))
            if target not in tensors:
                missing.append(target)
            else:
                w = shape_of(tensors, target)
                if (len(down_shape) < 2 or up_shape[0] != w[0] or down_shape[0] != up_shape[1]
                        or up_shape[0] * math.prod(down_shape[1:]) != math.prod(w)):
                    mismatched.append(f"{target}: weight {tuple(w)}, LoRA up {tuple(up_shape)} down {tuple(down_shape)}")
                else:
                    found.append((target, term))
        for suffix, default_target in ((".diff", ".weight"), (".diff_b", ".bias")):
            if suffix not in parts:
                continue
            target = module + default_target
            if suffix == ".diff" and target not in tensors and module in tensors:
                target = module
            if target not in tensors:
                missing.append(target)
                continue
            w, d = shape_of(tensors, target), ckpt.shape(parts[suffix])
            if math.prod(w) != math.prod(d):
                mismatched.append(f"{target}: weight {tuple(w)}, LoRA {suffix[1:]} {tuple(d)}")
            else:
                found.append((target, _Term(strength, ckpt, "diff", (parts[suffix],))))
        if pair is None and not any(s in parts for s in _SINGLE):
            raise CheckpointError(path, f"LoRA key {parts.get('.alpha')!r} has an alpha but no weights")
    if not found:
        sample = ", ".join((missing + mismatched)[:3])
        raise CheckpointError(path, "this LoRA does not fit the model (a LoRA for another architecture or model "
                              f"size?): none of its {len(missing) + len(mismatched)} targets match, e.g. {sample}")
    if mismatched:
        raise CheckpointError(path, f"{len(mismatched)} LoRA target(s) have the wrong shape for this model (another "
                              f"model size?), e.g. {'; '.join(mismatched[:3])}")
    if missing:
        raise CheckpointError(path, f"{len(missing)} LoRA target(s) are not in the model, e.g. {', '.join(missing[:5])}")
    for target, term in found:
        terms.setdefault(target, []).append(term)


def apply_loras(tensors: Mapping[str, torch.Tensor], scales: dict[str, torch.Tensor],
                loras: Sequence[tuple[str | os.PathLike, float]], *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> tuple[Mapping[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Merge `loras` [(file, strength), ...] into canonical `tensors` on read.

    Returns (merged view, scales without the merged fp8 layers). Every LoRA file is checked against
    the tensors' names and shapes here, from headers only: a key style we do not know, a target the
    model lacks or a shape that does not fit raises CheckpointError naming the LoRA file. Merged
    tensors come back in `dtype` (float32 by default; `load_module` then casts each one to the model's
    storage dtype, so only one merged tensor exists at a time). `device`: where the merge math runs
    and merged tensors are returned (pass the model's device: a GPU merges a 14B distill LoRA in
    seconds, a CPU takes minutes).
    """
    if not loras:
        return tensors, dict(scales)
    underscore_map: dict[str, str] = {}
    for name in tensors:
        for module in {name, name.rpartition(".")[0]}:
            underscore_map.setdefault(module.replace(".", "_"), module)
    terms: dict[str, list[_Term]] = {}
    for path, strength in loras:
        path = Path(path)
        _collect(path, _open_lora(path), float(strength), tensors, underscore_map, terms)
    low_rank = {t: ts for t, ts in terms.items() if _is_quantised(tensors, t) and all(x.kind == "lora" for x in ts)}
    terms = {t: ts for t, ts in terms.items() if t not in low_rank}
    kept = dict(scales)
    merged_scales = {}
    for target in terms:
        if target.endswith(".weight"):
            layer = target[: -len(".weight")]
            if layer in kept:
                merged_scales[layer] = kept.pop(layer)
    return LoraMergedView(tensors, merged_scales, terms, dtype, kept, torch.device(device), low_rank), kept


def _is_quantised(tensors: Mapping[str, torch.Tensor], key: str) -> bool:
    """fp8 or GGUF-packed storage: a weight a LoRA must not turn back into a float tensor."""
    return dtype_of(tensors, key) in FP8_DTYPES or packed_type_of(tensors, key) is not None


def attach_low_rank(module: nn.Module, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                    device: torch.device | str) -> int:
    """Give the loaded `module` the unmerged LoRA paths of a `LoraMergedView` (no-op for anything else).

    A layer that is a `layers.Linear` gets `lora_down`/`lora_up` buffers (its weight stays quantised);
    any other module (a conv loaded dequantised) gets the product merged into its weight. Returns the
    number of layers given a path.
    """
    if not isinstance(tensors, LoraMergedView) or not tensors.low_rank:
        return 0
    for layer, (down, up) in tensors.low_rank_paths(dtype, device).items():
        sub = module.get_submodule(layer)
        if isinstance(sub, Linear):
            sub.lora_down, sub.lora_up = down, up
        else:
            w = sub.weight
            w.data = (w.float() + (up.float() @ down.float()).reshape(w.shape)).to(w.dtype)
    return len(tensors.low_rank)
