"""InfiniteTalk DiT: Wan2.1-I2V-14B backbone + InfiniteTalk audio adapter + L-RoPE speaker binding.

One latent chunk per call, no batch dimension (the sampler calls it once per guidance branch).
State-dict names equal the published checkpoints' names (`blocks.N.self_attn.q.weight`, ...).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .attention import check_backend
from .audio_adapter import AudioProjModel, latent_audio_windows
from .dit_blocks import DiTBlock, Head, MLPProj, PatchEmbedding
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
                y: torch.Tensor, audio: torch.Tensor, ref_target_masks: torch.Tensor | None = None) -> torch.Tensor:
        """x `[16,T,h,w]`, t `[1]` on the 0..1000 scale, context `[L,text_dim]` (unpadded), clip_fea
        `[1,257,image_dim]`, y `[20,T,h,w]`, audio `[H, 4(T−1)+1, 5, layers, channels]` (H = persons, 1 or
        2), ref_target_masks `[3,h,w]` (person 1, person 2, background; used only when H = 2)."""
        self._check_inputs(x, context, clip_fea, y, audio, ref_target_masks)
        c, dtype = self.config, self.compute_dtype
        device = self.patch_embedding.weight.device
        human_num = audio.shape[0]

        # patchify: tokens in (frame, row, col) order
        latent = torch.cat([x, y], dim=0).to(device=device, dtype=dtype)
        tokens = self.patch_embedding(latent.unsqueeze(0))
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)  # [1, L, dim]
        n_t, n_h, n_w = grid

        # time: float64 sinusoid, float32 MLP
        t = torch.as_tensor(t, device=device).reshape(-1)[:1]
        e = self.time_embedding(timestep_sinusoid(c.freq_dim, t).float())
        e0 = self.time_projection(e).unflatten(1, (6, c.dim))

        # text (zero-padded to text_len, no mask: pad rows take part) and image context
        ctx = context.to(device=device, dtype=dtype)
        ctx = torch.cat([ctx, ctx.new_zeros(c.text_len - ctx.shape[0], ctx.shape[1])])
        text = self.text_embedding(ctx.unsqueeze(0))
        image = self.img_emb(clip_fea.to(device=device, dtype=dtype).reshape(1, -1, c.image_dim))

        # audio tokens per latent frame, persons concatenated: [N_t, H·context_tokens, output_dim]
        first, later = latent_audio_windows(audio.to(device=device, dtype=dtype), c.vae_scale, c.audio_window)
        audio_tokens = self.audio_proj(first, later).to(dtype)
        audio_tokens = audio_tokens.permute(1, 0, 2, 3).reshape(n_t, human_num * c.context_tokens, c.output_dim)

        token_masks = None
        if human_num == 2:
            masks = F.interpolate(ref_target_masks.to(device=device, dtype=torch.float32)[None], size=(n_h, n_w),
                                  mode="nearest")[0]
            token_masks = (masks > 0).view(masks.shape[0], -1).to(dtype)

        rope = video_rope_tables(grid, c.head_dim, device=device)
        for block in self.blocks:
            tokens = block(tokens, e0, rope, text, image, audio_tokens, token_masks, self.attention)

        out = self.head(tokens, e)[0]  # [L, prod(patch)·out_dim] float32
        pf, ph, pw = c.patch_size
        out = out.view(n_t, n_h, n_w, pf, ph, pw, c.out_dim)
        out = torch.einsum("fhwpqrc->cfphqwr", out)
        return out.reshape(c.out_dim, n_t * pf, n_h * ph, n_w * pw).float()
