"""Tiny random umT5 encoder + a tiny sentencepiece tokenizer, in the layouts users have, under
`<models>/text_encoders/`:

- `models_t5_umt5-xxl-enc-bf16.pth`           Wan-AI torch file, bf16, Wan names; tokenizer beside it
                                               as `spiece.model` (and `tokenizer.model`),
- `umt5_xxl_fp16.safetensors`                  Comfy-Org repackage, fp16, HF names, `spiece_model` embedded,
- `umt5_xxl_fp8_e4m3fn_scaled.safetensors`     Comfy-Org fp8 (legacy `scale_weight` + `scaled_fp8`), HF names,
                                               `spiece_model` embedded.

The tokenizer is a unigram sentencepiece model trained at write time on a generated English corpus
(single thread, fixed corpus: the same bytes every time), with umT5's special ids (pad 0, `</s>` 1, unk 2).
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from ..checkpoints.materialize import build_on_meta
from ..models.t5 import T5Config, T5Encoder
from ..text.prompts import DEFAULT_NEGATIVE_PROMPT
from .layouts import linear_weight_names, random_state_dict, save_fp8_legacy, save_pth, save_safetensors
from .spec import T5_BUCKETS, T5_DIM, T5_FFN, T5_HEADS, T5_LAYERS, T5_VOCAB

__all__ = ["write", "TINY_T5_CONFIG", "FILES", "state_dict", "hf_state_dict", "tokenizer_bytes"]

TINY_T5_CONFIG = T5Config(vocab=T5_VOCAB, dim=T5_DIM, dim_attn=T5_DIM, dim_ffn=T5_FFN, num_heads=T5_HEADS,
                          num_layers=T5_LAYERS, num_buckets=T5_BUCKETS)
FILES = {"wan_pth": "models_t5_umt5-xxl-enc-bf16.pth", "comfy_fp16": "umt5_xxl_fp16.safetensors",
         "comfy_fp8": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "tokenizer": "spiece.model",
         "tokenizer_alt": "tokenizer.model"}

_WORDS = (
    "a an the woman man person girl boy child people friends speaker singer host reporter anchor teacher "
    "speak talk sing smile look laugh nod turn move walk sit stand hold play explain say tell listen "
    "at to in on of with and or her his their its this that two three many one camera microphone guitar piano "
    "room studio office kitchen street park stage desk window background light sunlight lamp "
    "warm soft natural bright calm happy serious expressive realistic cinematic detailed sharp clear "
    "close-up medium wide shot portrait video frame face head eyes mouth lips hands fingers hair shirt jacket "
    "news podcast interview conversation song story lesson morning evening"
).split() + DEFAULT_NEGATIVE_PROMPT.replace(",", "").split()
_SUFFIXES = ("", "", "", "s", "ing", "ed", "ly", "er")


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [DEFAULT_NEGATIVE_PROMPT, "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()-&/"]
    for _ in range(3000):
        words = [rng.choice(_WORDS) + rng.choice(_SUFFIXES) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice((".", ",", "", "!")))
    return lines


def tokenizer_bytes(vocab_size: int = T5_VOCAB - 12) -> bytes:
    """Serialized unigram sentencepiece model (at most `vocab_size` pieces; umT5 special ids)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return buf.getvalue()


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 weights under Wan names."""
    return random_state_dict(build_on_meta(lambda: T5Encoder(TINY_T5_CONFIG)), seed=seed)


_WAN_TO_HF = (
    ("ffn.gate.0.", "layer.1.DenseReluDense.wi_0."), ("ffn.fc1.", "layer.1.DenseReluDense.wi_1."),
    ("ffn.fc2.", "layer.1.DenseReluDense.wo."), ("norm1.", "layer.0.layer_norm."), ("norm2.", "layer.1.layer_norm."),
    ("attn.", "layer.0.SelfAttention."), ("pos_embedding.embedding.", "layer.0.SelfAttention.relative_attention_bias."),
)


def _hf_name(name: str) -> str:
    if name == "token_embedding.weight":
        return "shared.weight"
    if name == "norm.weight":
        return "encoder.final_layer_norm.weight"
    _, index, rest = name.split(".", 2)
    for wan, hf in _WAN_TO_HF:
        if rest.startswith(wan):
            return f"encoder.block.{index}.{hf}{rest[len(wan):]}"
    raise KeyError(name)


def hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under HF/ComfyUI umT5 names."""
    return {_hf_name(k): v for k, v in sd.items()}


def write(models_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write every layout (and the tokenizer) into `models_dir/text_encoders/`; returns the paths written."""
    folder = Path(models_dir) / "text_encoders"
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict(seed)
    spiece = tokenizer_bytes()
    hf = hf_state_dict(sd)
    hf["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    meta = {"infinitetalk.num_heads": T5_HEADS}
    linears = [_hf_name(n) for n in linear_weight_names(build_on_meta(lambda: T5Encoder(TINY_T5_CONFIG)))]
    written = [
        save_pth(sd, folder / FILES["wan_pth"], dtype=torch.bfloat16),
        save_safetensors(hf, folder / FILES["comfy_fp16"], dtype=torch.float16, metadata=meta),
        save_fp8_legacy(hf, folder / FILES["comfy_fp8"], linear_names=linears, dtype=torch.float16, metadata=meta),
    ]
    for name in (FILES["tokenizer"], FILES["tokenizer_alt"]):
        (folder / name).write_bytes(spiece)
        written.append(folder / name)
    return written
