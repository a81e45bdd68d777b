"""Golden kinds `vae_encode` and `vae_decode`: the Wan2.1 VAE built through `load_vae` from the case's
weights, with the case's config and latent statistics, in float32 on CPU."""
from __future__ import annotations

import torch

from ...loaders.vae import load_vae
from ...models.vae import VAEConfig
from ..runner import Case, Outputs


def _model(case: Case):
    return load_vae(case.weights_path, dtype=torch.float32, device="cpu", config=VAEConfig.from_dict(case.config))


def run(case: Case) -> Outputs:
    inputs = case.inputs()
    if case.component == "vae_encode":
        return Outputs(tensors={"latent": _model(case).encode(inputs["video"].float())})
    if case.component == "vae_decode":
        return Outputs(tensors={"video": _model(case).decode(inputs["latent"].float())})
    raise ValueError(f"vae kind cannot run component {case.component!r}")
