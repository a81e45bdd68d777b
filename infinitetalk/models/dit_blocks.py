"""Building blocks of the Wan2.1-I2V DiT with the InfiniteTalk audio branch.

Dtype rules (the reference's, kept so bf16 runs behave like the original): LayerNorm/RMSNorm
statistics in float32, modulation/gating/head in float32, everything else in the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .audio_adapter import AudioCrossAttention, speaker_positions
from .layers import Linear
from .rope import apply_video_rope

__all__ = ["FP32LayerNorm", "LayerNorm", "RMSNorm", "PatchEmbedding", "SelfAttention", "I2VCrossAttention",
           "DiTBlock", "Head", "MLPProj", "reference_attention_map"]


class FP32LayerNorm(nn.Module):
    """LayerNorm computed in float32 (weights too), result in the input dtype (Wan's WanLayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim)) if affine else None
        self.bias = nn.Parameter(torch.empty(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


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
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.to(x.dtype)


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
    heads, d = q.shape[1], q.shape[-1]
    n_classes, s = token_masks.shape
    half = heads // 2
    used = 2 * half if half else heads
    vdim = max(d, n_classes)
    values = token_masks.new_zeros(1, used, s, vdim)
    values[..., :n_classes] = token_masks.t()
    sums = attention(q[:, :used], k[:, :used, :s], values, backend)[0, :, :, :n_classes]  # [used, L, 3]
    per_head = sums / token_masks.sum(dim=-1).clamp_min(1)  # an empty class scores 0, never NaN
    if not half:
        return per_head.mean(dim=0).t()
    return ((per_head[:half].mean(dim=0) + per_head[half:].mean(dim=0)) / 2).t()


class SelfAttention(nn.Module):
    """3-D RoPE self-attention with RMS qk-norm over the full width; optionally returns the map."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, token_masks: torch.Tensor | None,
                backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, dim = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = apply_video_rope(self.norm_q(self.q(x)).view(shape), rope).transpose(1, 2)
        k = apply_video_rope(self.norm_k(self.k(x)).view(shape), rope).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        out = self.o(attention(q, k, v, backend).transpose(1, 2).reshape(b, n, dim))
        attn_map = None if token_masks is None else reference_attention_map(q, k, token_masks, backend)
        return out, attn_map


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

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)

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
                text: torch.Tensor, image: torch.Tensor, audio_tokens: torch.Tensor,
                token_masks: torch.Tensor | None, backend: str) -> torch.Tensor:
        """`x` `[1, L, dim]`; `e0` `[1, 6, dim]` float32; `audio_tokens` `[N_t, N_a, audio_dim]`;
        `token_masks` `[3, S]` only for two speakers (turns on the reference map + L-RoPE)."""
        dtype = x.dtype
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.float() + e0).chunk(6, dim=1)
        y, attn_map = self.self_attn((self.norm1(x).float() * (1 + scale_msa) + shift_msa).to(dtype), rope,
                                     token_masks, backend)
        x = (x + y * gate_msa).to(dtype)
        x = x + self.cross_attn(self.norm3(x), text, image, backend)
        n_t = audio_tokens.shape[0]
        positions = None if attn_map is None else speaker_positions(attn_map)
        audio_in = self.norm_x(x).view(n_t, -1, x.shape[-1])
        x = x + self.audio_cross_attn(audio_in, audio_tokens, positions, backend).view(x.shape)
        y = self.ffn((self.norm2(x).float() * (1 + scale_ffn) + shift_ffn).to(dtype))
        return (x + y * gate_ffn).to(dtype)


class Head(nn.Module):
    """Final adaLN (shift/scale from the time embedding) and projection to patch pixels, float32."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))
        self.norm = FP32LayerNorm(dim, eps)
        self.head = Linear(dim, out_features)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x).float() * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP tokens -> model width: LN -> Linear -> GELU -> Linear -> LN (module names proj.0/1/3/4)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(in_dim), Linear(in_dim, in_dim), nn.GELU(), Linear(in_dim, out_dim),
                                  LayerNorm(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
