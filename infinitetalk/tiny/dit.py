"""Tiny random DiT in every file layout users have: base Wan2.1-I2V, InfiniteTalk patch, distill LoRAs.

Layouts (one file per distinct content; names mimic the published files with a `tiny_` prefix):

diffusion_models/   base I2V (no audio keys)
  tiny_wan2.1_i2v_480p_fp32.safetensors                      fp32, no prefix (the reference numbers)
  tiny_wan2.1_i2v_480p_bf16.safetensors                      bf16, `model.diffusion_model.` (Comfy-Org)
  tiny_wan2.1_i2v_480p_fp16.safetensors                      fp16, `diffusion_model.`
  tiny_Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors            plain fp8 block linears, no scales (Kijai)
  tiny_Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors  legacy scale_weight + scaled_fp8 marker
  tiny_wan2.1_i2v_480p_fp8_scaled.safetensors                comfy_quant in `_quantization_metadata`
  tiny_wan2.1_i2v_480p_fp8_rowwise.safetensors               per-layer `comfy_quant` tensors, per-row scales
  tiny_Wan2.1-I2V-14B-480P/diffusion_pytorch_model-0000k-of-00003.safetensors + index.json (Wan-AI, fp32)
  step-distilled DiT (LightX2V's 4-step InfiniteTalk; other random weights, base keys only, known by name):
  tiny_InfiniteTalk-4StepDistill-Mean-w-ITAudioAdaptorV6.1-bf16.safetensors   bf16, no prefix
  tiny_InfiniteTalk-4StepDistill-Mean-w-ITAudioAdaptorV6.1-fp8.safetensors    LightX2V fp8, `weight_scale` [out, 1]
model_patches/      the InfiniteTalk audio keys only
  tiny_MeiGen-InfiniteTalk/multi/infinitetalk.safetensors    fp32, no prefix (MeiGen)
  tiny_wan2.1_infiniteTalk_multi_fp16.safetensors            fp16 (Comfy-Org)
  tiny_Wan2_1-InfiniteTalk-Multi_fp8_e4m3fn_scaled_KJ.safetensors  legacy scaled fp8 (Kijai)
loras/
  tiny_lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors  `diffusion_model.`, down/up+alpha, diff, diff_b, diff_m
  tiny_Wan2.1_I2V_14B_FusionX_LoRA.safetensors               kohya `lora_unet_`, alpha != rank
  tiny_wan_i2v_peft_lora.safetensors                          `transformer.`, PEFT lora_A/lora_B, no alpha

Every file carries the metadata `infinitetalk.num_heads` / `infinitetalk.audio_layers` (sizes a loader
cannot read off tensor shapes; real files do not need them because the real sizes are known).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoints.materialize import build_on_meta
from ..loaders.dit import is_audio_key
from . import spec
from .layouts import (
    linear_weight_names, random_lora, random_state_dict, save_fp8_comfy_quant, save_fp8_legacy, save_fp8_lightx2v,
    save_lora, save_safetensors, save_sharded,
)

if TYPE_CHECKING:
    from ..models.dit import DiTConfig, InfiniteTalkDiT

__all__ = ["write", "tiny_config", "tiny_state", "is_audio_key", "METADATA", "DISTILLED_DIT"]

METADATA = {"infinitetalk.num_heads": str(spec.DIT_HEADS), "infinitetalk.audio_layers": str(spec.AUDIO_LAYERS)}
LORA_RANK = 4
DISTILLED_DIT = "InfiniteTalk-4StepDistill-Mean-w-ITAudioAdaptorV6.1"   # LightX2V's file name, less -bf16 / -fp8


def tiny_config() -> DiTConfig:
    """The tiny DiTConfig matching the other tiny components (text/image/audio widths from spec)."""
    from ..models.dit import DiTConfig

    return DiTConfig(dim=spec.DIT_DIM, ffn_dim=spec.DIT_FFN, num_heads=spec.DIT_HEADS, num_layers=spec.DIT_LAYERS,
                     text_dim=spec.T5_DIM, image_dim=spec.CLIP_DIM, intermediate_dim=spec.DIT_AUDIO_INTERMEDIATE,
                     output_dim=spec.DIT_AUDIO_TOKEN_DIM, context_tokens=spec.DIT_AUDIO_CONTEXT_TOKENS,
                     audio_layers=spec.AUDIO_LAYERS, audio_channels=spec.AUDIO_CHANNELS)


def tiny_state(seed: int = 0) -> tuple[InfiniteTalkDiT, dict[str, torch.Tensor]]:
    """(meta-built model, full float32 state dict) of the tiny InfiniteTalk DiT."""
    from ..models.dit import InfiniteTalkDiT

    cfg = tiny_config()
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=torch.float32))
    return model, random_state_dict(model, seed)


def write(models_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write every tiny DiT layout under `models_dir`; returns the entry points (files / index json)."""
    root = Path(models_dir)
    model, state = tiny_state(seed)
    base = {k: v for k, v in state.items() if not is_audio_key(k)}
    patch = {k: v for k, v in state.items() if is_audio_key(k)}
    block_linears = [n for n in linear_weight_names(model, "blocks.") if n in base]
    audio_linears = [n for n in linear_weight_names(model) if n in patch]
    dm, mp, lo = root / "diffusion_models", root / "model_patches", root / "loras"
    meta = METADATA
    out = [
        save_safetensors(base, dm / "tiny_wan2.1_i2v_480p_fp32.safetensors", metadata=meta),
        save_safetensors(base, dm / "tiny_wan2.1_i2v_480p_bf16.safetensors", "model.diffusion_model.",
                         torch.bfloat16, meta),
        save_safetensors(base, dm / "tiny_wan2.1_i2v_480p_fp16.safetensors", "diffusion_model.", torch.float16, meta),
        save_fp8_legacy(base, dm / "tiny_Wan2_1-I2V-14B-480P_fp8_e4m3fn.safetensors", "", block_linears,
                        scaled=False, metadata=meta),
        save_fp8_legacy(base, dm / "tiny_Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors", "", block_linears,
                        marker_dtype=torch.float32, metadata=meta),
        save_fp8_comfy_quant(base, dm / "tiny_wan2.1_i2v_480p_fp8_scaled.safetensors", "model.diffusion_model.",
                             block_linears, metadata=meta),
        save_fp8_comfy_quant(base, dm / "tiny_wan2.1_i2v_480p_fp8_rowwise.safetensors", "", block_linears,
                             per_tensor_json=True, per_row=True, metadata=meta),
        save_sharded(base, dm / "tiny_Wan2.1-I2V-14B-480P", 3, metadata=meta),
        save_safetensors(patch, mp / "tiny_MeiGen-InfiniteTalk" / "multi" / "infinitetalk.safetensors", metadata=meta),
        save_safetensors(patch, mp / "tiny_wan2.1_infiniteTalk_multi_fp16.safetensors", dtype=torch.float16,
                         metadata=meta),
        save_fp8_legacy(patch, mp / "tiny_Wan2_1-InfiniteTalk-Multi_fp8_e4m3fn_scaled_KJ.safetensors", "",
                        audio_linears, metadata=meta),
    ]
    _, turbo_state = tiny_state(seed + 10)
    turbo = {k: v for k, v in turbo_state.items() if not is_audio_key(k)}
    turbo_linears = [n for n in block_linears if n.split(".")[2] in ("self_attn", "cross_attn", "ffn")]
    out += [
        save_safetensors(turbo, dm / f"tiny_{DISTILLED_DIT}-bf16.safetensors", dtype=torch.bfloat16, metadata=meta),
        save_fp8_lightx2v(turbo, dm / f"tiny_{DISTILLED_DIT}-fp8.safetensors", turbo_linears, metadata=meta),
    ]
    norms = [n[: -len(".weight")] for n in base if n.startswith("blocks.") and ".norm" in n and n.endswith(".weight")]
    biased = [n[: -len(".weight")] for n in block_linears if n[: -len(".weight")] + ".bias" in base]
    distill = random_lora(base, LORA_RANK, seed + 1, block_linears, alpha=LORA_RANK, diff_names=norms,
                          diff_b_names=biased)
    distill.update({f"blocks.{i}.diff_m": torch.full((1, 6, spec.DIT_DIM), 0.01) for i in range(spec.DIT_LAYERS)})
    out.append(save_lora(distill, lo / "tiny_lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors",
                         "diffusion_model.", metadata=meta))
    fusion = random_lora(base, LORA_RANK, seed + 2, block_linears, alpha=LORA_RANK / 2, diff_names=["head.modulation"])
    out.append(save_lora(fusion, lo / "tiny_Wan2.1_I2V_14B_FusionX_LoRA.safetensors", "lora_unet_", metadata=meta))
    peft = random_lora(base, LORA_RANK, seed + 3, [n for n in block_linears if ".self_attn." in n])
    out.append(save_lora(peft, lo / "tiny_wan_i2v_peft_lora.safetensors", "transformer.", peft_names=True,
                         metadata=meta))
    return out
