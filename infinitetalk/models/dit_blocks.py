"""Building blocks of the Wan2.1-I2V DiT with the InfiniteTalk audio branch.

Dtype rules (the reference's, kept so bf16 runs behave like the original): LayerNorm/RMSNorm
statistics in float32, modulation/gating/head in float32, everything else in the activation dtype.
The float32 islands are `ops.fused` functions (one kernel each once fusion is enabled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import fused
from .attention import attention
from .audio_adapter import AudioCrossAttention, speaker_positions
from .layers import Linear

__all__ = ["FP32LayerNorm", "LayerNorm", "RMSNorm", "PatchEmbedding", "SelfAttention", "I2VCrossAttention",
           "DiTBlock", "Head", "MLPProj", "reference_attention_map", "SampleAudio", "TokenShard"]


@dataclass
class SampleAudio:
    """One batch sample's audio branch: tokens `[N_t, persons·context_tokens, audio_dim]` and, for two
    speakers, the region masks `[3, S]` that turn on the reference map + L-RoPE."""

    tokens: torch.Tensor
    token_masks: torch.Tensor | None = None


@dataclass
class TokenShard:
    """Sequence parallelism: this process holds tokens `start … start+L_local` of the window's `n_tokens`
    (the rest is zero padding past `n_tokens`). `group` is a `ops.parallel.SequenceGroup` (duck-typed:
    `rank`, `size`, `tokens_to_heads`, `heads_to_tokens`, `all_reduce`, `split`)."""

    group: Any
    n_tokens: int
    start: int


class FP32LayerNorm(nn.Module):
    """LayerNorm computed in float32 (weights too), result in the input dtype (Wan's WanLayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim)) if affine else None
        self.bias = nn.Parameter(torch.empty(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.layer_norm(x, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in the input dtype whatever the storage dtype (the CLIP projector's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class RMSNorm(nn.Module):
    """Wan RMSNorm: normalise in float32, cast back, then scale (the weight multiplies after the cast)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)


class PatchEmbedding(nn.Conv3d):
    """Conv3d patchifier (kernel = stride = patch size) computing in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride)


def reference_attention_map(q: torch.Tensor, k: torch.Tensor, token_masks: torch.Tensor,
                            backend: str) -> torch.Tensor:
    """How much each visual token attends to each region of latent frame 0: `[3, L]`.

    `q`, `k` `[1, heads, L, d]` after RoPE; `token_masks` `[3, S]` (0/1, S = tokens of one frame).
    Per head: softmax(q·ref_kᵀ/√d) summed over each mask, divided by the mask's size; averaged over
    the two halves of the heads like the reference (an odd last head is left out). The masked sums are
    computed as one attention whose values are the masks (no L×S matrix is materialised).
    """
    heads = q.shape[1]
    half = heads // 2
    used = 2 * half if half else heads
    per_head = _masked_attention_means(q[:, :used], k[:, :used], token_masks, backend)
    if not half:
        return per_head.mean(dim=0).t()
    return ((per_head[:half].mean(dim=0) + per_head[half:].mean(dim=0)) / 2).t()


def _masked_attention_means(q: torch.Tensor, k: torch.Tensor, token_masks: torch.Tensor,
                            backend: str) -> torch.Tensor:
    """Per head: softmax(q·ref_kᵀ/√d) summed over each mask / the mask's size, `[heads, L, 3]`."""
    d = q.shape[-1]
    n_classes, s = token_masks.shape
    values = token_masks.new_zeros(1, q.shape[1], s, max(d, n_classes))
    values[..., :n_classes] = token_masks.t()
    sums = attention(q, k[:, :, :s], values, backend)[0, :, :, :n_classes]
    return sums / token_masks.sum(dim=-1).clamp_min(1)  # an empty class scores 0, never NaN


def sharded_reference_attention_map(q: torch.Tensor, k: torch.Tensor, token_masks: torch.Tensor, backend: str,
                                    shard: TokenShard, total_heads: int) -> torch.Tensor:
    """`reference_attention_map` when this process holds heads `rank·h … (rank+1)·h` of all tokens (after
    the Ulysses all-to-all): per-half head sums are reduced over the group, then averaged like the reference."""
    local = q.shape[1]
    half = total_heads // 2
    used = 2 * half if half else total_heads
    index = torch.arange(shard.group.rank * local, (shard.group.rank + 1) * local, device=q.device)
    per_head = _masked_attention_means(q, k, token_masks, backend)  # [local, L, 3]
    first, second = index < half, (index >= half) & (index < used)
    partial = torch.stack([per_head[first].sum(dim=0), per_head[second].sum(dim=0)])
    partial = shard.group.all_reduce(partial.contiguous())
    if not half:
        return (partial[1] / used).t()
    return ((partial[0] / half + partial[1] / half) / 2).t()


class SelfAttention(nn.Module):
    """3-D RoPE self-attention with RMS qk-norm over the full width; optionally returns the map."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, token_masks: list[torch.Tensor | None],
                backend: str, shard: TokenShard | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """`x` `[B, L, dim]`; `token_masks[b]` `[3, S]` builds sample b's reference map (else None).
        With a shard, `x` and `rope` hold this process's tokens and heads are exchanged (Ulysses)."""
        b, n, dim = x.shape
        q = fused.rms_norm_rope(self.q(x), self.norm_q.weight, self.norm_q.eps, rope)
        k = fused.rms_norm_rope(self.k(x), self.norm_k.weight, self.norm_k.eps, rope)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim)
        if shard is not None:  # [B, L_local, heads, d] -> [B, L, heads/P, d]
            q, k, v = (shard.group.tokens_to_heads(t, shard.n_tokens) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = attention(q, k, v, backend).transpose(1, 2)
        if shard is not None:
            out = shard.group.heads_to_tokens(out)
        out = self.o(out.reshape(b, n, dim))
        maps: list[torch.Tensor | None] = []
        for i, masks in enumerate(token_masks):
            if masks is None:
                maps.append(None)
            elif shard is None:
                maps.append(reference_attention_map(q[i:i + 1], k[i:i + 1], masks, backend))
            else:
                maps.append(sharded_reference_attention_map(q[i:i + 1], k[i:i + 1], masks, backend, shard,
                                                            self.num_heads))
        return out, maps


class I2VCrossAttention(nn.Module):
    """Cross-attention to text and to CLIP image tokens: o(attn(q,text) + attn(q,image))."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.k_img, self.v_img = Linear(dim, dim), Linear(dim, dim)
        self.norm_q, self.norm_k, self.norm_k_img = RMSNorm(dim, eps), RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor, backend: str) -> torch.Tensor:
        b, n, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # context shared by the batch may come with batch 1
            return t.view(t.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)

        q = heads(self.norm_q(self.q(x)))
        out_text = attention(q, heads(self.norm_k(self.k(text))), heads(self.v(text)), backend)
        out_img = attention(q, heads(self.norm_k_img(self.k_img(image))), heads(self.v_img(image)), backend)
        return self.o((out_text + out_img).transpose(1, 2).reshape(b, n, dim))


class DiTBlock(nn.Module):
    """adaLN self-attention -> text/image cross-attention -> audio cross-attention -> adaLN FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, audio_dim: int, norm_input_visual: bool):
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        self.norm1 = FP32LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, affine=True)
        self.cross_attn = I2VCrossAttention(dim, num_heads, eps)
        self.audio_cross_attn = AudioCrossAttention(dim, audio_dim, num_heads)
        self.norm_x = FP32LayerNorm(dim, eps, affine=True) if norm_input_visual else nn.Identity()
        self.norm2 = FP32LayerNorm(dim, eps)
        self.ffn = nn.Sequential(Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: torch.Tensor,
                text: torch.Tensor, image: torch.Tensor, audio: list[SampleAudio], backend: str,
                shard: TokenShard | None = None) -> torch.Tensor:
        """`x` `[B, L, dim]` (B guidance samples of one latent); `e0` `[1, 6, dim]` float32; `text`
        `[B, text_len, dim]`; `image` `[1 or B, N, dim]`; `audio[b]` sample b's audio tokens (+ masks).
        With a shard, `x`/`rope` hold only this process's tokens (sequence parallelism)."""
        dtype, eps = x.dtype, self.norm1.eps
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.float() + e0).chunk(6, dim=1)
        y, maps = self.self_attn(fused.modulated_norm(x, shift_msa, scale_msa, eps, dtype), rope,
                                 [a.token_masks for a in audio], backend, shard)
        x = fused.gated_residual(x, y, gate_msa)
        x = x + self.cross_attn(self.norm3(x), text, image, backend)
        audio_out = []
        for i, (sample, attn_map) in enumerate(zip(audio, maps)):
            positions = None if attn_map is None else speaker_positions(attn_map)
            audio_in = self.norm_x(x[i])
            if shard is None:
                n_t = sample.tokens.shape[0]
                out = self.audio_cross_attn(audio_in.view(n_t, -1, x.shape[-1]), sample.tokens, positions, backend)
            else:
                if positions is not None:
                    positions = shard.group.split(positions, dim=0)
                out = self.audio_cross_attn.forward_range(audio_in, sample.tokens, positions, shard.start,
                                                          shard.n_tokens, backend)
            audio_out.append(out.reshape(audio_in.shape))
        x = x + torch.stack(audio_out)
        y = self.ffn(fused.modulated_norm(x, shift_ffn, scale_ffn, eps, dtype))
        return fused.gated_residual(x, y, gate_ffn)


class Head(nn.Module):
    """Final adaLN (shift/scale from the time embedding) and projection to patch pixels, float32."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))
        self.norm = FP32LayerNorm(dim, eps)
        self.head = Linear(dim, out_features)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(fused.modulated_norm(x, shift, scale, self.norm.eps, torch.float32))


class MLPProj(nn.Module):
    """CLIP tokens -> model width: LN -> Linear -> GELU -> Linear -> LN (module names proj.0/1/3/4)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(in_dim), Linear(in_dim, in_dim), nn.GELU(), Linear(in_dim, out_dim),
                                  LayerNorm(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
