"""umT5 encoder (Wan's `T5Encoder`, umT5-XXL topology): the text tower feeding the DiT's cross-attention.

State-dict names are those of Wan's `models_t5_umt5-xxl-enc-bf16.pth`. umT5 specifics kept here:
every block owns its relative-position bias (no sharing), attention logits are not scaled by
1/sqrt(head_dim), the norm is an RMS norm computed in float32, and the FFN is gated with tanh-GELU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear

__all__ = ["T5Config", "T5Encoder", "relative_position_buckets"]


@dataclass(frozen=True)
class T5Config:
    """Sizes of a umT5 encoder; defaults are umT5-XXL as Wan uses it."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | None = None) -> torch.Tensor:
    """Bidirectional T5 bucket index [length, length] for key position j relative to query i.

    Half the buckets hold keys after the query; in each half the first quarter of the buckets are exact
    offsets and the rest grow logarithmically up to `max_distance`.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    log_ratio = torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < exact, rel, large)


class T5RMSNorm(nn.Module):
    """T5 layer norm: RMS only, no mean and no bias; float32 inside, scale applied after casting back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * y.to(x.dtype)


class T5RelativeBias(nn.Module):
    """Per-layer learned bias per (bucket, head), added to the attention logits."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """Bias [1, heads, length, length]."""
        idx = relative_position_buckets(length, self.num_buckets, self.max_distance, self.embedding.weight.device)
        bias = F.embedding(idx, self.embedding.weight.to(dtype))
        return bias.permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim_attn, bias=False)
        self.k = Linear(dim, dim_attn, bias=False)
        self.v = Linear(dim, dim_attn, bias=False)
        self.o = Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Explicit logits + float32 softmax, as the reference computes them, not `scaled_dot_product_attention`:
        the CPU fused kernel rounds differently with the thread count (small head dims), so a torchrun rank
        (torchrun sets OMP_NUM_THREADS=1) would encode another context than one process on all cores, and
        40 denoising steps turn that 1e-6 into visibly different frames. The prompt is short (≤ 512 tokens)
        and encoded once per job, so the L×L logits cost nothing that matters."""
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias   # T5: unscaled logits
        weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = torch.matmul(weights, v)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential so its weight is named `gate.0`."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = Linear(dim, dim_ffn, bias=False)
        self.fc2 = Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Keep fp16 activations finite (the reference clamps the residual stream the same way)."""
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(x.shape[1], x.dtype)
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask[:, None, None, :], torch.finfo(x.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """ids [B, L] (+ mask [B, L], 1 = real token) -> hidden states [B, L, dim] after the final norm.

    Computes in the dtype of `token_embedding` (the storage dtype chosen at load time). Padded keys are
    masked out; rows of padded positions are computed but meaningless.
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        key_mask = None if mask is None else mask.to(x.device) != 0
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)
