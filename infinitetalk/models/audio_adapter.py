"""InfiniteTalk's audio adapter: wav2vec windows -> per-latent-frame audio tokens -> cross-attention.

Multi-person binding (L-RoPE): visual tokens get a 1-D rotary position from the speaker region they
attend to most in the reference frame (person 1 -> 0..4, person 2 -> 20..24, background 12), and
each person's audio tokens get the centre of their range (2 / 22), so the per-frame audio attention
prefers the matching person's voice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .layers import Linear
from .rope import apply_rope_1d

__all__ = ["AudioProjModel", "AudioCrossAttention", "latent_audio_windows", "speaker_positions",
           "CLASS_RANGE", "CLASS_INTERVAL"]

CLASS_RANGE = 24
CLASS_INTERVAL = 4
_PERSON1 = (0, CLASS_INTERVAL)
_PERSON2 = (CLASS_RANGE - CLASS_INTERVAL, CLASS_RANGE)
_BACKGROUND = CLASS_RANGE // 2


def latent_audio_windows(audio: torch.Tensor, vae_scale: int, audio_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `[H, 1+vae_scale·(T−1), w, layers, C]` video-frame windows into the first latent's window
    `[H, 1, w, layers, C]` and the later latents' `[H, T−1, w+vae_scale−1, layers, C]`.

    A later latent covers video frames f0..f3: entries 0..mid of f0, the centre entry of the middle
    frames, entries mid.. of the last frame — the contiguous window f0−mid … f3+mid.
    """
    first = audio[:, :1]
    h, n = audio.shape[0], audio.shape[1] - 1
    later = audio[:, 1:].reshape(h, n // vae_scale, vae_scale, *audio.shape[2:])
    mid = audio_window // 2
    head = later[:, :, 0, : mid + 1]
    middle = later[:, :, 1:-1, mid: mid + 1].flatten(2, 3)
    tail = later[:, :, -1, mid:]
    return first, torch.cat([head, middle, tail], dim=2)


class AudioProjModel(nn.Module):
    """Audio windows -> `context_tokens` tokens of width `output_dim` per latent frame and person."""

    def __init__(self, in_first: int, in_later: int, intermediate_dim: int, output_dim: int,
                 context_tokens: int, norm_output_audio: bool = True):
        super().__init__()
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.proj1 = Linear(in_first, intermediate_dim)
        self.proj1_vf = Linear(in_later, intermediate_dim)
        self.proj2 = Linear(intermediate_dim, intermediate_dim)
        self.proj3 = Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim) if norm_output_audio else None

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """`first` `[H,1,...]`, `later` `[H,T−1,...]` -> tokens `[H, T, context_tokens, output_dim]`."""
        h = first.shape[0]
        a0 = torch.relu(self.proj1(first.flatten(2)))
        a1 = torch.relu(self.proj1_vf(later.flatten(2))) if later.shape[1] else a0[:, :0]
        c = torch.relu(self.proj2(torch.cat([a0, a1], dim=1)))
        tokens = self.proj3(c).unflatten(-1, (self.context_tokens, self.output_dim))
        if self.norm is not None:  # fp32 island in the reference (autocast float32)
            n = self.norm
            tokens = F.layer_norm(tokens.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
        return tokens.reshape(h, -1, self.context_tokens, self.output_dim)


def speaker_positions(attn_map: torch.Tensor) -> torch.Tensor:
    """L-RoPE query positions `[L]` from the `[3, L]` map (person 1, person 2, background).

    Each person's row is min-max normalised over all tokens into its range; every token takes the
    value of the class with the largest raw map value (background -> 12). Computed in the map's dtype
    like the reference (bf16 in production, hence coarse positions).
    """
    row_max = attn_map.max(dim=1).values
    row_min = attn_map.min(dim=1).values
    p1 = (attn_map[0] - row_min[0]) / (row_max[0] - row_min[0] + 1e-8) * (_PERSON1[1] - _PERSON1[0]) + _PERSON1[0]
    p2 = (attn_map[1] - row_min[1]) / (row_max[1] - row_min[1] + 1e-8) * (_PERSON2[1] - _PERSON2[0]) + _PERSON2[0]
    back = torch.full_like(p1, _BACKGROUND)
    choice = attn_map.argmax(dim=0)
    return torch.stack([p1, p2, back]).gather(0, choice[None])[0]


class AudioCrossAttention(nn.Module):
    """Per-frame cross-attention of visual tokens to that frame's audio tokens (no qk-norm, no gate)."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = Linear(dim, dim)
        self.kv_linear = Linear(audio_dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, audio_tokens: torch.Tensor, positions: torch.Tensor | None,
                backend: str = "sdpa") -> torch.Tensor:
        """`x` `[N_t, S, dim]` (S tokens per latent frame), `audio_tokens` `[N_t, N_a, audio_dim]`
        (persons concatenated along N_a); `positions` `[N_t·S]` turns on the two-person L-RoPE."""
        n_t, s, dim = x.shape
        q = self.q_linear(x).view(n_t, s, self.num_heads, self.head_dim).transpose(1, 2)  # [N_t, heads, S, d]
        k, v = self._keys_values(audio_tokens, positions is not None)
        if positions is not None:
            q = apply_rope_1d(q, positions.view(n_t, 1, s))
        out = attention(q, k, v, backend)
        return self.proj(out.transpose(1, 2).reshape(n_t, s, dim))

    def forward_range(self, x: torch.Tensor, audio_tokens: torch.Tensor, positions: torch.Tensor | None,
                      start: int, n_tokens: int, backend: str = "sdpa") -> torch.Tensor:
        """`forward` for the contiguous tokens `start … start+len(x)` of the window's `n_tokens` (a sequence-
        parallel shard, which may cut latent frames; rows past `n_tokens` are padding and come back 0).
        `x` `[L_local, dim]`, `positions` `[L_local]` or None -> `[L_local, dim]`."""
        n_local, dim = x.shape
        n_t = audio_tokens.shape[0]
        frame_tokens = n_tokens // n_t
        q = self.q_linear(x).view(n_local, self.num_heads, self.head_dim).transpose(0, 1)  # [heads, L_local, d]
        k, v = self._keys_values(audio_tokens, positions is not None)
        if positions is not None:
            q = apply_rope_1d(q, positions.view(1, n_local))
        out = q.new_zeros(q.shape)
        stop = min(start + n_local, n_tokens)
        for frame in range(start // frame_tokens, -(-stop // frame_tokens)) if stop > start else ():
            lo, hi = max(frame * frame_tokens, start) - start, min((frame + 1) * frame_tokens, stop) - start
            out[:, lo:hi] = attention(q[None, :, lo:hi], k[frame:frame + 1], v[frame:frame + 1], backend)[0]
        return self.proj(out.transpose(0, 1).reshape(n_local, dim))

    def _keys_values(self, audio_tokens: torch.Tensor, speaker_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[N_t, heads, N_a, d]`; keys rotated to their person's L-RoPE centre when asked."""
        n_t, n_a = audio_tokens.shape[:2]
        kv = self.kv_linear(audio_tokens).view(n_t, n_a, 2, self.num_heads, self.head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if speaker_rope:
            key_pos = torch.empty(n_a, dtype=k.dtype, device=k.device)
            key_pos[: n_a // 2] = (_PERSON1[0] + _PERSON1[1]) / 2
            key_pos[n_a // 2:] = (_PERSON2[0] + _PERSON2[1]) / 2
            k = apply_rope_1d(k, key_pos)
        return k, v

