"""InfiniteTalk DiT: Wan2.1-I2V-14B backbone + InfiniteTalk audio adapter + L-RoPE speaker binding.

`forward` takes one latent chunk (no batch dimension); `forward_batch` runs several guidance branches of the
same latent at once (they differ only in text context and audio). An optional `sequence` group (see
`ops.parallel`) splits the tokens across processes (Ulysses sequence parallelism).
State-dict names equal the published checkpoints' names (`blocks.N.self_attn.q.weight`, ...).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .attention import check_backend
from .audio_adapter import AudioProjModel, latent_audio_windows
from .dit_blocks import DiTBlock, Head, MLPProj, PatchEmbedding, SampleAudio, TokenShard
from .layers import Linear
from .rope import timestep_sinusoid, video_rope_tables

__all__ = ["DiTConfig", "InfiniteTalkDiT"]


@dataclass(frozen=True)
class DiTConfig:
    """Architecture sizes. Defaults = InfiniteTalk on Wan2.1-I2V-14B except the per-model sizes."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 36
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    audio_window: int = 5
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32
    vae_scale: int = 4
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    image_dim: int = 1280
    audio_layers: int = 12
    audio_channels: int = 768

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even width")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_in_first(self) -> int:
        """proj1 input width: the first latent's window of video frames × layers × channels."""
        return self.audio_window * self.audio_layers * self.audio_channels

    @property
    def audio_in_later(self) -> int:
        """proj1_vf input width: later latents see audio_window + vae_scale − 1 video frames."""
        return (self.audio_window + self.vae_scale - 1) * self.audio_layers * self.audio_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


class InfiniteTalkDiT(nn.Module):
    """`forward(x, t, context, clip_fea, y, audio, ref_target_masks)` -> velocity `[out_dim, T, h, w]`.

    `compute_dtype` is the activation dtype (bf16 in production, float32 for parity); float32 islands
    (norm statistics, time embedding, modulation, gating, head, audio-token LayerNorm) as the reference.
    `attention` names the attention backend (see `models.attention`).
    """

    def __init__(self, config: DiTConfig, compute_dtype: torch.dtype = torch.bfloat16, attention: str = "sdpa"):
        super().__init__()
        c = self.config = config
        self.compute_dtype = compute_dtype
        self.attention = check_backend(attention)
        self.patch_embedding = PatchEmbedding(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(Linear(c.freq_dim, c.dim), nn.SiLU(), Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(
            DiTBlock(c.dim, c.ffn_dim, c.num_heads, c.eps, c.output_dim, c.norm_input_visual)
            for _ in range(c.num_layers))
        self.head = Head(c.dim, math.prod(c.patch_size) * c.out_dim, c.eps)
        self.img_emb = MLPProj(c.image_dim, c.dim)
        self.audio_proj = AudioProjModel(c.audio_in_first, c.audio_in_later, c.intermediate_dim, c.output_dim,
                                         c.context_tokens, c.norm_output_audio)

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, x, context, clip_fea, y, audio, ref_target_masks) -> None:
        c = self.config
        if x.dim() != 4 or x.shape[0] != c.out_dim:
            raise InputError("x", f"expected a latent [{c.out_dim}, T, h, w], got {tuple(x.shape)}")
        _, n_frames, h, w = x.shape
        if y.shape != (c.in_dim - c.out_dim, n_frames, h, w):
            raise InputError("y", f"expected [{c.in_dim - c.out_dim}, {n_frames}, {h}, {w}] "
                                  f"(mask + conditioning latent), got {tuple(y.shape)}")
        if context.dim() != 2 or context.shape[1] != c.text_dim or context.shape[0] > c.text_len:
            raise InputError("context", f"expected text features [L<={c.text_len}, {c.text_dim}], "
                                        f"got {tuple(context.shape)}")
        if clip_fea.shape[-1] != c.image_dim or clip_fea.dim() not in (2, 3):
            raise InputError("clip_fea", f"expected CLIP tokens [1, N, {c.image_dim}], got {tuple(clip_fea.shape)}")
        n_video = c.vae_scale * (n_frames - 1) + 1
        window = (c.audio_window, c.audio_layers * c.audio_channels)
        if (audio.dim() != 5 or audio.shape[1] != n_video or audio.shape[2] != window[0]
                or audio.shape[3] * audio.shape[4] != window[1]):
            raise InputError("audio", f"expected [persons, {n_video}, {c.audio_window}, {c.audio_layers}, "
                                      f"{c.audio_channels}] for {n_frames} latent frames, got {tuple(audio.shape)}")
        if audio.shape[0] not in (1, 2):
            raise InputError("audio", f"1 or 2 persons supported, got {audio.shape[0]}")
        if audio.shape[0] == 2 and (ref_target_masks is None or ref_target_masks.dim() != 3
                                    or ref_target_masks.shape[0] != 3):
            got = None if ref_target_masks is None else tuple(ref_target_masks.shape)
            raise InputError("ref_target_masks", f"two persons need masks [3, h, w] (person 1, person 2, "
                                                 f"background), got {got}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, clip_fea: torch.Tensor,
                y: torch.Tensor, audio: torch.Tensor, ref_target_masks: torch.Tensor | None = None,
                sequence: Any = None, block_cache: Any = None) -> torch.Tensor:
        """x `[16,T,h,w]`, t `[1]` on the 0..1000 scale, context `[L,text_dim]` (unpadded), clip_fea
        `[1,257,image_dim]`, y `[20,T,h,w]`, audio `[H, 4(T−1)+1, 5, layers, channels]` (H = persons, 1 or
        2), ref_target_masks `[3,h,w]` (person 1, person 2, background; used only when H = 2).
        `sequence`: a `ops.parallel.SequenceGroup` to share the call with (every member calls it with
        equal arguments; every member gets the whole output). `block_cache`: step skipping (pipeline/teacache.py),
        an object whose `run(tokens, e0, e, blocks)` returns the block stack's output."""
        return self.forward_batch(x, t, [context], clip_fea, y, [audio], ref_target_masks, sequence, block_cache)[0]

    def forward_batch(self, x: torch.Tensor, t: torch.Tensor | float, contexts: Sequence[torch.Tensor],
                      clip_fea: torch.Tensor, y: torch.Tensor, audios: Sequence[torch.Tensor],
                      ref_target_masks: torch.Tensor | None = None, sequence: Any = None,
                      block_cache: Any = None) -> torch.Tensor:
        """Several guidance branches of one latent in one pass -> `[B, 16, T, h, w]`; branch b sees
        `contexts[b]` and `audios[b]` (person counts may differ between branches). Equal to B `forward` calls."""
        c, dtype = self.config, self.compute_dtype
        if len(contexts) != len(audios) or not contexts:
            raise InputError("audios", f"need one audio per context (≥ 1), got {len(audios)} audios for "
                                       f"{len(contexts)} contexts")
        for context, audio in zip(contexts, audios):
            self._check_inputs(x, context, clip_fea, y, audio, ref_target_masks)
        if sequence is not None and c.num_heads % sequence.size:
            raise InputError("world_size", f"sequence parallelism over {sequence.size} ranks needs a head count "
                                           f"divisible by {sequence.size}; this model has {c.num_heads} heads")
        device = self.patch_embedding.weight.device
        batch = len(contexts)

        # patchify (shared by the batch): tokens in (frame, row, col) order
        latent = torch.cat([x, y], dim=0).to(device=device, dtype=dtype)
        tokens = self.patch_embedding(latent.unsqueeze(0))
        grid = tuple(tokens.shape[2:])
        # [B, L, dim], contiguous: the residual stream every block reads along its channels
        tokens = tokens.flatten(2).transpose(1, 2).expand(batch, -1, -1).contiguous()
        n_t, n_h, n_w = grid
        n_tokens = n_t * n_h * n_w

        # time: float64 sinusoid, float32 MLP
        t = torch.as_tensor(t, device=device).reshape(-1)[:1]
        e = self.time_embedding(timestep_sinusoid(c.freq_dim, t).float())
        e0 = self.time_projection(e).unflatten(1, (6, c.dim))

        # text (zero-padded to text_len, no mask: pad rows take part) and image context
        ctx = [context.to(device=device, dtype=dtype) for context in contexts]
        ctx = torch.stack([torch.cat([a, a.new_zeros(c.text_len - a.shape[0], a.shape[1])]) for a in ctx])
        text = self.text_embedding(ctx)
        image = self.img_emb(clip_fea.to(device=device, dtype=dtype).reshape(1, -1, c.image_dim))

        audio = [self._sample_audio(a, ref_target_masks, grid) for a in audios]
        rope = video_rope_tables(grid, c.head_dim, device=device)
        shard = None
        if sequence is not None:
            shard = TokenShard(sequence, n_tokens, sequence.local_range(n_tokens)[0])
            tokens, rope = sequence.split(tokens, dim=1), sequence.split(rope, dim=0)

        def run_blocks(tokens: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                tokens = block(tokens, e0, rope, text, image, audio, self.attention, shard)
            return tokens

        tokens = run_blocks(tokens) if block_cache is None else block_cache.run(tokens, e0, e, run_blocks)

        out = self.head(tokens, e)  # [B, L, prod(patch)·out_dim] float32
        if sequence is not None:
            out = sequence.gather(out, n_tokens, dim=1)
        pf, ph, pw = c.patch_size
        out = out.view(batch, n_t, n_h, n_w, pf, ph, pw, c.out_dim)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        return out.reshape(batch, c.out_dim, n_t * pf, n_h * ph, n_w * pw).float()

    def _sample_audio(self, audio: torch.Tensor, ref_target_masks: torch.Tensor | None,
                      grid: tuple[int, int, int]) -> SampleAudio:
        """Audio tokens per latent frame, persons concatenated `[N_t, H·context_tokens, output_dim]`, and the
        region masks `[3, h·w]` for two persons."""
        c, dtype = self.config, self.compute_dtype
        device = self.patch_embedding.weight.device
        n_t, n_h, n_w = grid
        human_num = audio.shape[0]
        first, later = latent_audio_windows(audio.to(device=device, dtype=dtype), c.vae_scale, c.audio_window)
        tokens = self.audio_proj(first, later).to(dtype)
        tokens = tokens.permute(1, 0, 2, 3).reshape(n_t, human_num * c.context_tokens, c.output_dim)
        token_masks = None
        if human_num == 2:
            masks = F.interpolate(ref_target_masks.to(device=device, dtype=torch.float32)[None], size=(n_h, n_w),
                                  mode="nearest")[0]
            token_masks = (masks > 0).view(masks.shape[0], -1).to(dtype)
        return SampleAudio(tokens, token_masks)
