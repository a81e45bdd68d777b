"""Writers for the file layouts users really have, shared by every tiny component.

Each writer takes a canonical state dict (the reference's unprefixed names, float32) and stores it the
way one family of published files does: plain/prefixed safetensors at a chosen precision, Wan-AI
shards with an index, torch pickles, ComfyUI's two fp8 generations and LoRA files. Tiny files carry
`infinitetalk.*` metadata (sizes a loader cannot read off the shapes); real files never do.
"""
from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "random_state_dict", "linear_weight_names", "save_safetensors", "save_sharded", "save_pth",
    "save_fp8_legacy", "save_fp8_comfy_quant", "save_fp8_lightx2v", "random_lora", "save_lora",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _generator(seed: int, name: str) -> torch.Generator:
    # one stream per tensor name: adding a tensor does not change the others
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def random_state_dict(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 values for every state-dict entry of a (meta-built) module.

    Linear/conv weights: normal, std 1/sqrt(fan_in); nn.Embedding tables: std 0.5; biases: std 0.05;
    norm scales (1-D `weight`, `gamma`): uniform 1 +- 0.1; other parameters (modulation tables,
    class/position embeddings, ...): std 0.1. Integer buffers are zero. Nothing is exactly zero, so
    every path of the model contributes to the output.
    """
    embeddings = {n for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    out: dict[str, torch.Tensor] = {}
    for name, ref in module.state_dict(keep_vars=True).items():
        shape = tuple(ref.shape)
        if not ref.dtype.is_floating_point:
            out[name] = torch.zeros(shape, dtype=ref.dtype, device="cpu")
            continue
        g = _generator(seed, name)
        owner, _, leaf = name.rpartition(".")
        if leaf == "bias":
            t = torch.randn(shape, generator=g) * 0.05
        elif leaf == "gamma" or (leaf == "weight" and len(shape) == 1):
            t = 1.0 + (torch.rand(shape, generator=g) * 2 - 1) * 0.1
        elif leaf == "weight" and owner in embeddings:
            t = torch.randn(shape, generator=g) * 0.5
        elif leaf.startswith("weight") and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:
            t = torch.randn(shape, generator=g) * 0.1
        out[name] = t.contiguous()
    return out


def linear_weight_names(module: nn.Module, under: str = "") -> list[str]:
    """`<layer>.weight` of every nn.Linear (including layers.Linear) whose name starts with `under`."""
    return [f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.startswith(under)]


def _metadata(metadata: Mapping[str, object] | None) -> dict[str, str]:
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path, prefix: str = "",
                     dtype: torch.dtype | None = None, metadata: Mapping[str, object] | None = None) -> Path:
    """One safetensors file; floating tensors cast to `dtype` (kept as given when None)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: _cast(v, dtype) for k, v in state.items()}, str(path), metadata=_metadata(metadata))
    return path


def save_sharded(state: Mapping[str, torch.Tensor], folder: str | Path, n_shards: int, prefix: str = "",
                 dtype: torch.dtype | None = None, metadata: Mapping[str, object] | None = None,
                 name: str = "diffusion_pytorch_model") -> Path:
    """Wan-AI style shards `<name>-0000k-of-0000n.safetensors` + `<name>.safetensors.index.json`.

    Keys are split in order into `n_shards` runs of about equal byte size. Returns the index path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = [(prefix + k, _cast(v, dtype)) for k, v in state.items()]
    total = sum(t.numel() * t.element_size() for _, t in items)
    n_shards = max(1, min(n_shards, len(items)))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    done = 0
    for i, (k, t) in enumerate(items):
        left = len(items) - i
        idx = min(n_shards - 1, int(done * n_shards / max(total, 1)))
        idx = max(idx, n_shards - left)  # every shard gets at least one tensor
        shards[idx][k] = t
        done += t.numel() * t.element_size()
    weight_map: dict[str, str] = {}
    meta = _metadata(metadata)
    for i, shard in enumerate(shards, start=1):
        fname = f"{name}-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    index = folder / f"{name}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total, **{k: v for k, v in meta.items() if k != "format"}},
                                 "weight_map": weight_map}, indent=2))
    return index


def save_pth(state: Mapping[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None = None,
             wrapper: str | None = None) -> Path:
    """A torch pickle (`torch.save`) of the state dict, optionally wrapped as `{wrapper: state}`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: _cast(v, dtype) for k, v in state.items()}
    torch.save({wrapper: sd} if wrapper else sd, str(path))
    return path


def _quantize_fp8(w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.to(torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    return (w / scale).to(torch.float8_e4m3fn), scale


def _default_linear_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]


def save_fp8_legacy(state: Mapping[str, torch.Tensor], path: str | Path, prefix: str = "",
                    linear_names: Iterable[str] | None = None, dtype: torch.dtype = torch.bfloat16,
                    scaled: bool = True, marker_dtype: torch.dtype = torch.float8_e4m3fn,
                    metadata: Mapping[str, object] | None = None) -> Path:
    """ComfyUI's first fp8 generation.

    `scaled=True` (`*_fp8_scaled`, Kijai `*_fp8_e4m3fn_scaled_KJ`): listed Linear weights in
    float8_e4m3fn with a per-tensor `scale_weight` [1], `scale_input` 1.0, and the `scaled_fp8`
    marker (empty tensor of `marker_dtype`). `scaled=False` (`*_fp8_e4m3fn`): a plain cast, no scales.
    Other tensors are stored in `dtype`.
    """
    quant = set(_default_linear_names(state) if linear_names is None else linear_names)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in quant:
            layer = k[: -len(".weight")]
            if scaled:
                q, scale = _quantize_fp8(v, per_row=False)
                out[prefix + k] = q
                out[prefix + layer + ".scale_weight"] = scale.reshape(1)
                out[prefix + layer + ".scale_input"] = torch.ones(1)
            else:
                out[prefix + k] = v.to(torch.float8_e4m3fn)
        else:
            out[prefix + k] = _cast(v, dtype)
    if scaled:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=marker_dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=_metadata(metadata))
    return path


def save_fp8_comfy_quant(state: Mapping[str, torch.Tensor], path: str | Path, prefix: str = "",
                         linear_names: Iterable[str] | None = None, dtype: torch.dtype = torch.bfloat16,
                         per_tensor_json: bool = False, per_row: bool = False,
                         metadata: Mapping[str, object] | None = None) -> Path:
    """ComfyUI's current ("mixed precision") fp8 layout.

    Listed Linear weights in float8_e4m3fn with `weight_scale` (0-d per tensor, or `[out]` per row
    when `per_row`) and an `input_scale`; the per-layer format goes into the header metadata
    `_quantization_metadata` or, with `per_tensor_json`, into uint8 JSON tensors `<layer>.comfy_quant`.
    """
    quant = set(_default_linear_names(state) if linear_names is None else linear_names)
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for k, v in state.items():
        if k not in quant:
            out[prefix + k] = _cast(v, dtype)
            continue
        layer = prefix + k[: -len(".weight")]
        q, scale = _quantize_fp8(v, per_row=per_row)
        out[prefix + k] = q
        out[layer + ".weight_scale"] = scale.reshape(-1) if per_row else scale.reshape(())
        out[layer + ".input_scale"] = torch.tensor(1.0)
        spec = {"format": "float8_e4m3fn"}
        if per_tensor_json:
            out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8)
        else:
            layers[layer] = spec
    meta = dict(metadata or {})
    if layers:
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=_metadata(meta))
    return path


def save_fp8_lightx2v(state: Mapping[str, torch.Tensor], path: str | Path, linear_names: Iterable[str],
                      dtype: torch.dtype = torch.bfloat16, metadata: Mapping[str, object] | None = None) -> Path:
    """LightX2V's fp8 files (their converter, `fp8` / `fp8-sgl` schemes): listed Linear weights in
    float8_e4m3fn with a float32 per-output-row `<layer>.weight_scale` of shape [out, 1] (row amax / 448),
    no marker and no format metadata; every other tensor in `dtype`."""
    quant = set(linear_names)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in quant:
            out[k], scale = _quantize_fp8(v, per_row=True)
            out[k[: -len(".weight")] + ".weight_scale"] = scale.to(torch.float32).contiguous()
        else:
            out[k] = _cast(v, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=_metadata(metadata))
    return path


def random_lora(state: Mapping[str, torch.Tensor], rank: int, seed: int = 0, linear_names: Iterable[str] | None = None,
                alpha: float | None = None, diff_names: Iterable[str] = (), diff_b_names: Iterable[str] = (),
                std: float = 0.02) -> dict[str, torch.Tensor]:
    """A random LoRA over `state` in canonical names (no prefix): `<layer>.lora_down.weight` [rank, in],
    `<layer>.lora_up.weight` [out, rank] (+ `<layer>.alpha` when given) for each listed Linear weight,
    `<m>.diff` (full delta of `<m>.weight`, or of `<m>` itself when it has no `.weight`) and
    `<layer>.diff_b` (bias delta)."""
    out: dict[str, torch.Tensor] = {}
    for k in _default_linear_names(state) if linear_names is None else linear_names:
        layer = k[: -len(".weight")]
        w = state[k]
        g = _generator(seed, "lora:" + k)
        out[layer + ".lora_down.weight"] = torch.randn((rank, w.shape[1]), generator=g) / math.sqrt(w.shape[1])
        out[layer + ".lora_up.weight"] = torch.randn((w.shape[0], rank), generator=g) * std
        if alpha is not None:
            out[layer + ".alpha"] = torch.tensor(float(alpha))
    for m in diff_names:
        target = state[m + ".weight"] if m + ".weight" in state else state[m]
        out[m + ".diff"] = torch.randn(target.shape, generator=_generator(seed, "diff:" + m)) * std
    for layer in diff_b_names:
        out[layer + ".diff_b"] = torch.randn(state[layer + ".bias"].shape, generator=_generator(seed, "diffb:" + layer)) * std
    return out


_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha", ".diff_b",
                  ".diff_m", ".diff")


def save_lora(lora: Mapping[str, torch.Tensor], path: str | Path, prefix: str = "diffusion_model.",
              dtype: torch.dtype | None = torch.bfloat16, peft_names: bool = False,
              metadata: Mapping[str, object] | None = None) -> Path:
    """Write a canonical-named LoRA (see `random_lora`) in a published key style.

    `prefix` "diffusion_model." (lightx2v, MeiGen), "model.diffusion_model.", "transformer." or
    "lora_unet_" (kohya style: module path with dots turned into underscores). `peft_names` writes
    `lora_A`/`lora_B` instead of `lora_down`/`lora_up`.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in lora.items():
        suffix = next(s for s in _LORA_SUFFIXES if k.endswith(s))
        module = k[: -len(suffix)]
        if peft_names:
            suffix = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight"}.get(suffix, suffix)
        if prefix == "lora_unet_":
            module = module.replace(".", "_")
        out[prefix + module + suffix] = v if suffix == ".alpha" else _cast(v, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=_metadata(metadata))
    return path
