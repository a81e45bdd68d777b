"""`dit` golden cases: the InfiniteTalk DiT in float32, built through `load_dit` like real files."""
from __future__ import annotations

import dataclasses

import torch

from ...loaders.dit import load_dit
from ...models.dit import DiTConfig
from ..runner import Case, Outputs

# reference constructor arguments that are fixed in this implementation: name -> the only value supported
_FIXED = {"model_type": "i2v", "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}
_IGNORED = {"weight_init"}


def _config_overrides(config: dict) -> dict:
    """The case's constructor arguments as DiTConfig fields; unsupported settings fail loudly."""
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    out = {}
    for key, value in config.items():
        if key in _IGNORED:
            continue
        if key in _FIXED:
            if value != _FIXED[key]:
                raise ValueError(f"dit config {key}={value!r} is not supported (only {_FIXED[key]!r})")
            continue
        if key not in fields:
            raise ValueError(f"dit config field {key!r} is not known to this implementation")
        out[key] = value
    return out


def run(case: Case) -> Outputs:
    config = _config_overrides(case.config)
    model = load_dit(case.weights_path, dtype=torch.float32, num_heads=config.pop("num_heads", None), config=config)
    inputs = case.inputs()
    human_num = case.call.get("human_num", inputs["audio"].shape[0])
    if human_num != inputs["audio"].shape[0]:
        raise ValueError(f"call.human_num {human_num} != audio persons {inputs['audio'].shape[0]}")
    out = model(inputs["x"], inputs["t"], inputs["context"], inputs["clip_fea"], inputs["y"], inputs["audio"],
                inputs.get("ref_target_masks"))
    seq_len = case.call.get("seq_len")
    pf, ph, pw = model.config.patch_size
    n_tokens = (out.shape[1] // pf) * (out.shape[2] // ph) * (out.shape[3] // pw)
    if seq_len is not None and seq_len != n_tokens:
        raise ValueError(f"call.seq_len {seq_len} != token count {n_tokens} (padding tokens are not supported)")
    return Outputs(tensors={"out": out})
