"""Wan2.1 VAE file -> ready `WanVAE`.

Accepted files (same tensor names, different containers / dtypes / wrappers):
- `Wan2.1_VAE.pth` (Wan-AI, torch zip, fp32, read with weights_only),
- `wan_2.1_vae.safetensors` (Comfy-Org repackage; ComfyUI's `comfy/ldm/wan/vae.py` uses the Wan names),
- `Wan2_1_VAE_bf16.safetensors` / `_fp32` (Kijai),
- any of them under a wrapper prefix (`model.`, `vae.`, `first_stage_model.`, …).
The architecture (dim, dim_mult, res blocks, attention, temporal downsampling) is read from tensor shapes.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import torch

from ..checkpoints.lazy import shape_of
from ..checkpoints.layout import CanonicalView, canonical_view
from ..checkpoints.materialize import build_on_meta, load_module
from ..errors import CheckpointError
from ..checkpoints.reader import open_checkpoint
from ..models.vae import VAEConfig, WanVAE

__all__ = ["load_vae", "infer_vae_config"]

ANCHORS = ("decoder.conv1.weight", "encoder.conv1.weight", "decoder.head.0.gamma")
_REQUIRED = ("encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.conv1.weight", "decoder.head.2.weight")


def _vae_tensors(path: str) -> CanonicalView:
    """The VAE's tensors, also under a wrapper prefix canonical_view does not know (e.g. `vae.`)."""
    view = canonical_view(open_checkpoint(path), anchors=ANCHORS)
    if all(k in view for k in _REQUIRED):
        return view
    for key in view:
        if key.endswith("decoder.head.0.gamma"):
            renamed = view.strip_prefix(key[: -len("decoder.head.0.gamma")])
            if all(k in renamed for k in _REQUIRED):
                return renamed
    missing = [k for k in _REQUIRED if k not in view]
    raise CheckpointError(path, f"not a Wan2.1 VAE checkpoint (no {', '.join(missing)}; "
                                f"found {len(view)} tensors such as {', '.join(list(view)[:3]) or 'none'})")


def infer_vae_config(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> VAEConfig:
    """Read the `WanVAE_` constructor arguments from tensor shapes (encoder side)."""
    shape = functools.partial(shape_of, tensors)
    z_dim = int(shape("conv2.weight")[0])
    if z_dim != 16 or "decoder.upsamples.0.upsamples.0.residual.0.gamma" in tensors:
        raise CheckpointError(source, f"latent channels {z_dim}: this is not a Wan2.1 VAE "
                                      "(Wan2.2's 48-channel VAE is not supported; use Wan2.1_VAE)")
    if tuple(shape("encoder.conv1.weight")[1:]) != (3, 3, 3, 3) or int(shape("decoder.head.2.weight")[0]) != 3:
        raise CheckpointError(source, "VAE does not map 3-channel RGB video (unsupported variant)")
    dim = int(shape("encoder.conv1.weight")[0])
    parts: dict[int, set[str]] = {}
    for key in tensors:
        m = re.match(r"encoder\.downsamples\.(\d+)\.(residual|resample|time_conv|to_qkv)\.", key)
        if m:
            parts.setdefault(int(m.group(1)), set()).add(m.group(2))
    stages: list[dict] = [{"res": 0, "out": dim, "attn": False, "time": False}]
    for i in sorted(parts):
        stage = stages[-1]
        if "residual" in parts[i]:
            stage["res"] += 1
            stage["out"] = int(shape(f"encoder.downsamples.{i}.residual.2.weight")[0])
        elif "to_qkv" in parts[i]:
            stage["attn"] = True
        else:  # a Resample; time_conv marks temporal downsampling
            stage["time"] = "time_conv" in parts[i]
            stages.append({"res": 0, "out": stage["out"], "attn": False, "time": False})
    counts = {s["res"] for s in stages}
    if len(counts) != 1 or 0 in counts or any(s["out"] % dim for s in stages):
        raise CheckpointError(source, "unexpected VAE encoder layout (cannot infer dim_mult / num_res_blocks)")
    return VAEConfig(
        dim=dim,
        z_dim=z_dim,
        dim_mult=tuple(s["out"] // dim for s in stages),
        num_res_blocks=counts.pop(),
        attn_scales=tuple(1.0 / 2 ** i for i, s in enumerate(stages) if s["attn"]),
        temperal_downsample=tuple(s["time"] for s in stages[:-1]),
    )


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             config: VAEConfig | None = None) -> WanVAE:
    """Load a Wan2.1 VAE file; `config` overrides the shape-inferred architecture (parity cases)."""
    source = str(path)
    tensors = _vae_tensors(source)
    cfg = config if config is not None else infer_vae_config(tensors, source)
    model = build_on_meta(lambda: WanVAE(cfg))
    return load_module(model, tensors, dtype=dtype, device=device, source=source)
