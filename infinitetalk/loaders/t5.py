"""umT5 text encoder files -> `TextEncoder` (model + tokenizer).

Accepted files (layout recognised from the key names, never from the file name):
- Wan: `models_t5_umt5-xxl-enc-bf16.pth` (`token_embedding.weight`, `blocks.N.*`), tokenizer beside it
  (`google/umt5-xxl/spiece.model` as in the Wan model folder, or `spiece.model` / `tokenizer.model`);
- ComfyUI / HF: `umt5_xxl_fp16.safetensors`, `umt5_xxl_fp8_e4m3fn_scaled.safetensors` (`shared.weight`,
  `encoder.block.N.layer.*`; fp8 weights stay fp8 with their scales), tokenizer embedded as the uint8
  tensor `spiece_model`. Any wrapper prefix before these names is accepted.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..checkpoints.layout import CanonicalView, canonical_view
from ..checkpoints.materialize import build_on_meta, load_module
from ..errors import CheckpointError, InputError
from ..checkpoints.reader import open_checkpoint
from ..models.t5 import T5Config, T5Encoder
from ..text.encoder import TextEncoder
from ..text.tokenizer import UMT5Tokenizer
from ._tensor_map import TensorMap

__all__ = ["load_text_encoder", "load_t5_encoder", "t5_tensors", "infer_t5_config", "find_tokenizer",
           "TOKENIZER_NAMES"]

_WAN_ANCHOR = "blocks.0.ffn.gate.0.weight"
_HF_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_SPIECE_KEY = "spiece_model"
# where a tokenizer is looked for beside the checkpoint, in this order
TOKENIZER_NAMES = ("spiece.model", "tokenizer.model", "google/umt5-xxl/spiece.model", "umt5-xxl/spiece.model")

# HF/ComfyUI umT5 names -> Wan names (applied to the name after the wrapper prefix)
_HF_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(a), b) for a, b in (
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
))


def _hf_to_wan(name: str) -> str | None:
    for pattern, repl in _HF_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def _prefix_of(names, anchor: str) -> str | None:
    for name in names:
        if name.endswith(anchor) and (name == anchor or name[-len(anchor) - 1] == "."):
            return name[: -len(anchor)]
    return None


def t5_tensors(view: CanonicalView) -> tuple[TensorMap, dict[str, torch.Tensor], str]:
    """Wan-named lazy tensors, fp8 scales by Wan layer name, and the layout found ('wan' or 'hf')."""
    names = list(view)
    tensors = TensorMap()
    scales = view.scales()
    prefix = _prefix_of(names, _WAN_ANCHOR)
    if prefix is not None:
        def rename(n: str) -> str | None:
            return n[len(prefix):] if n.startswith(prefix) else None
        layout = "wan"
    else:
        prefix = _prefix_of(names, _HF_ANCHOR)
        if prefix is None:
            raise CheckpointError(view.path, (
                "not a umT5 text encoder: expected Wan names (token_embedding.weight, blocks.N.ffn.gate.0.weight) "
                "or HF/ComfyUI names (shared.weight, encoder.block.N.layer.0.SelfAttention.q.weight); "
                f"found e.g. {', '.join(names[:3])}"))
        layout = "hf"
        if prefix + "shared.weight" not in view and prefix + "encoder.embed_tokens.weight" in view:
            alias = prefix + "encoder.embed_tokens.weight"
        else:
            alias = None

        def rename(n: str) -> str | None:
            if not n.startswith(prefix):
                return None
            if n == alias:
                return "token_embedding.weight"
            return _hf_to_wan(n[len(prefix):])
    for name in names:
        target = rename(name)
        if target is not None:
            tensors.add(target, view.shape(name), lambda n=name: view[n])
    renamed_scales = {}
    for layer, scale in scales.items():
        target = rename(layer + ".weight")
        if target is not None:
            renamed_scales[target[: -len(".weight")]] = scale
    _check_umt5(view, tensors, layout)
    return tensors, renamed_scales, layout


def _check_umt5(view: CanonicalView, tensors: TensorMap, layout: str) -> None:
    blocks = _block_count(tensors)
    if "token_embedding.weight" not in tensors or blocks == 0:
        raise CheckpointError(view.path, "umT5 text encoder is missing its token embedding or blocks")
    if blocks > 1 and "blocks.1.pos_embedding.embedding.weight" not in tensors:
        raise CheckpointError(view.path, (
            "this is a T5 v1.1 encoder (relative position bias only in block 0, e.g. the t5xxl used by Flux/SD3), "
            "not umT5; InfiniteTalk needs umT5-XXL (umt5_xxl_fp16.safetensors or models_t5_umt5-xxl-enc-bf16.pth)"))


def _block_count(tensors: TensorMap) -> int:
    found = {int(m.group(1)) for n in tensors if (m := re.match(r"blocks\.(\d+)\.", n))}
    return max(found) + 1 if found else 0


def infer_t5_config(tensors: TensorMap) -> T5Config:
    """Every size from tensor shapes; heads from the per-layer bias table [num_buckets, num_heads]."""
    vocab, dim = tensors.shape("token_embedding.weight")
    buckets, heads = tensors.shape("blocks.0.pos_embedding.embedding.weight")
    return T5Config(
        vocab=vocab, dim=dim,
        dim_attn=tensors.shape("blocks.0.attn.q.weight")[0],
        dim_ffn=tensors.shape("blocks.0.ffn.fc1.weight")[0],
        num_heads=heads, num_layers=_block_count(tensors), num_buckets=buckets)


def _build(view: CanonicalView, tensors: TensorMap, scales: dict[str, torch.Tensor], config: T5Config | None,
           dtype: torch.dtype, device: torch.device | str) -> T5Encoder:
    cfg = config or infer_t5_config(tensors)
    if cfg.dim_attn % cfg.num_heads:
        raise CheckpointError(view.path, f"attention width {cfg.dim_attn} is not divisible by {cfg.num_heads} heads")
    model = build_on_meta(lambda: T5Encoder(cfg))
    return load_module(model, tensors, dtype=dtype, device=device, scales=scales, source=str(view.path))


def load_t5_encoder(path: str | os.PathLike, *, config: T5Config | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> T5Encoder:
    """The umT5 encoder module alone (config inferred from shapes unless given)."""
    view = canonical_view(open_checkpoint(path))
    tensors, scales, _ = t5_tensors(view)
    return _build(view, tensors, scales, config, dtype, device)


def _tokenizer_in_folder(folder: Path) -> Path | None:
    for name in TOKENIZER_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def find_tokenizer(view: CanonicalView, tokenizer: UMT5Tokenizer | str | os.PathLike | None = None) -> UMT5Tokenizer:
    """The tokenizer passed in, else the one embedded in the checkpoint, else one beside it."""
    if isinstance(tokenizer, UMT5Tokenizer):
        return tokenizer
    if tokenizer is not None:
        p = Path(tokenizer)
        if p.is_dir():
            found = _tokenizer_in_folder(p)
            if found is None:
                raise InputError("tokenizer", f"{p}: folder holds none of {', '.join(TOKENIZER_NAMES)}")
            p = found
        if not p.is_file():
            raise InputError("tokenizer", f"{p}: no such file (expected the umT5 spiece.model)")
        return UMT5Tokenizer.from_file(p)
    embedded = [n for n in view if n == _SPIECE_KEY or n.endswith("." + _SPIECE_KEY)]
    if embedded:
        return UMT5Tokenizer.from_tensor(view[embedded[0]], source=f"{view.path} [{embedded[0]}]")
    beside = _tokenizer_in_folder(Path(view.path).parent)
    if beside is not None:
        return UMT5Tokenizer.from_file(beside)
    raise CheckpointError(view.path, (
        f"no umT5 tokenizer: the file embeds no '{_SPIECE_KEY}' and none of {', '.join(TOKENIZER_NAMES)} lies "
        "beside it; pass the tokenizer (spiece.model of google/umt5-xxl) explicitly"))


def load_text_encoder(path: str | os.PathLike, tokenizer: UMT5Tokenizer | str | os.PathLike | None = None, *,
                      dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> TextEncoder:
    """umT5 checkpoint (+ tokenizer) -> ready `TextEncoder`; the tokenizer is resolved before the weights load."""
    view = canonical_view(open_checkpoint(path))
    tensors, scales, _ = t5_tensors(view)  # refuses a wrong file before looking for a tokenizer
    tok = find_tokenizer(view, tokenizer)
    model = _build(view, tensors, scales, None, dtype, device)
    if tok.vocab_size > model.config.vocab:
        raise CheckpointError(tok.source, (
            f"tokenizer has {tok.vocab_size} pieces but the text encoder {path} only {model.config.vocab} "
            "embeddings: wrong tokenizer for this model"))
    return TextEncoder(model, tok)
