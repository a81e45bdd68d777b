"""Golden kind `t5`: umT5 encoder through the real loader (Wan or HF names), rows of the real tokens."""
from __future__ import annotations

import torch

from ...loaders.t5 import load_t5_encoder
from ...models.t5 import T5Config
from ..runner import Case, Outputs


def config_from_case(cfg: dict) -> T5Config:
    """The reference's umt5 constructor arguments -> T5Config (only per-layer bias is supported)."""
    if cfg.get("shared_pos", False):
        raise ValueError("shared_pos=True (T5 v1.1 style) is not umT5; not supported")
    return T5Config(vocab=cfg["vocab_size"], dim=cfg["dim"], dim_attn=cfg["dim_attn"], dim_ffn=cfg["dim_ffn"],
                    num_heads=cfg["num_heads"], num_layers=cfg["encoder_layers"], num_buckets=cfg["num_buckets"])


def run(case: Case) -> Outputs:
    model = load_t5_encoder(case.weights_path, config=config_from_case(case.config), dtype=torch.float32)
    inputs = case.inputs()
    ids, mask = inputs["ids"], inputs["mask"]
    out = model(ids, mask)
    real = int(mask[0].gt(0).sum())
    return Outputs(tensors={"context": out[0, :real]})
