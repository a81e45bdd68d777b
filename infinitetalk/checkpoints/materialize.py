"""Build modules on the `meta` device and fill them by assignment.

A model is never materialised at full precision and then cast (the reference's ~76 GB fp32 detour):
each checkpoint tensor is read, converted to its storage dtype, placed on the device and assigned, so
peak host memory is the model at its storage dtype plus one tensor in flight.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..models.layers import Linear
from .lazy import packed_type_of, shape_of
from ..errors import CheckpointError

__all__ = ["build_on_meta", "load_module", "FP8_DTYPES"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating its parameters."""
    with torch.device("meta"):
        module = factory()
    return module.requires_grad_(False).eval()


def _is_quantizable_weight(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return False
    try:
        return isinstance(module.get_submodule(owner), Linear)
    except AttributeError:
        return False


def load_module(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    keep_fp32: Callable[[str], bool] = lambda name: False,
    scales: Mapping[str, torch.Tensor] | None = None,
    keep_fp8: bool = True,
    source: str = "checkpoint",
    strict: bool = True,
) -> nn.Module:
    """Assign `tensors` (checkpoint names = module state-dict names) into a meta-built `module`.

    - `dtype`: storage dtype for floating tensors; names for which `keep_fp32(name)` is true stay fp32.
    - fp8 tensors feeding a `layers.Linear` weight stay fp8 when `keep_fp8` (dequantised at use with the
      scale from `scales[<layer name>]`); any other fp8 tensor is dequantised here.
    - GGUF-quantised Linear weights (`tensors.packed_type(name)`) stay packed when `keep_fp8` (see
      `checkpoints.gguf`); other GGUF-quantised tensors are read dequantised.
    - integer tensors keep their dtype. Shapes must match exactly; missing names are an error when
      `strict`; extra names are always ignored (pre-training heads, unused text towers, ...).
    """
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in tensors]
    if strict and missing:
        sample = ", ".join(missing[:5])
        raise CheckpointError(source, f"missing {len(missing)} tensor(s) the model needs, e.g. {sample}")
    scales = dict(scales or {})
    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[torch.Tensor, int]] = {}  # GGUF Linear weights kept as blocks: owner -> (data, type)
    for name, ref in expected.items():
        if name not in tensors:
            continue
        qtype = packed_type_of(tensors, name)
        if qtype is not None and keep_fp8 and _is_quantizable_weight(module, name):
            if tuple(shape_of(tensors, name)) != tuple(ref.shape):
                raise CheckpointError(source, f"tensor {name!r} has shape {tuple(shape_of(tensors, name))}, the "
                                              f"model expects {tuple(ref.shape)}")
            packed[name.rpartition(".")[0]] = (tensors.packed(name).to(device), qtype)
            continue
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                source, f"tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        owner = name.rpartition(".")[0]
        if t.dtype in FP8_DTYPES and keep_fp8 and _is_quantizable_weight(module, name):
            state[name] = t.to(device)
            continue
        if owner in scales and name.endswith(".weight"):
            # dequantise here (fp8 outside a Linear, or a scale that came with a non-fp8 weight)
            t = t.to(torch.float32) * scales.pop(owner).to(torch.float32)
        elif t.dtype in FP8_DTYPES:
            t = t.to(torch.float32)
        if t.is_floating_point():
            target = torch.float32 if keep_fp32(name) else dtype
            t = t.to(device=device, dtype=target)
        else:
            t = t.to(device)
        state[name] = t
        del t
    module.load_state_dict(state, strict=False, assign=True)
    for owner, (data, qtype) in packed.items():
        sub = module.get_submodule(owner)
        sub.weight = nn.Parameter(data, requires_grad=False)
        sub.gguf_type = qtype
    for owner, scale in scales.items():
        try:
            sub = module.get_submodule(owner)
        except AttributeError:
            continue
        if getattr(sub, "weight", None) is not None and sub.weight.dtype in FP8_DTYPES:
            sub.weight_scale = scale.to(device=device, dtype=torch.float32)
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    leftover += [n for n, b in module.named_buffers() if b is not None and b.is_meta]
    if leftover:
        raise CheckpointError(source, f"{len(leftover)} tensor(s) were not loaded, e.g. {', '.join(leftover[:5])}")
    return module.requires_grad_(False).eval()
