"""The VRAM budget and what fits in it: which DiT blocks stay resident, which stream, whether the guidance
calls of a step may run as one batch, and how the VAE tiles its decode.

Everything here is arithmetic on byte counts (no tensors, no device), so the same decision serves the
`plan` command (sizes read from file headers), the loader (sizes of the loaded modules) and tests. The
formula and its named constants are documented in docs/runtime.md; they are estimates of the peak of
PyTorch's allocator, calibrated against the blocks' code in models/dit_blocks.py, not measurements.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..models.layers import fp8_matmul_workspace_bytes

__all__ = ["GiB", "AUTO_MARGIN_BYTES", "RUNTIME_RESERVE_BYTES", "PREFETCH_BLOCKS", "JobShape", "DiTWeights",
           "Placement", "dit_activation_bytes", "vae_decode_bytes", "vae_tile_work", "tile_spans",
           "teacache_bytes", "decide_placement", "spread_indices",
           "auto_budget_bytes", "ceil_gib"]

GiB = 2**30
MiB = 2**20

# -- budget ---------------------------------------------------------------------------------------------
AUTO_MARGIN_BYTES = 1 * GiB          # left free when the budget is automatic (free memory − this)
RUNTIME_RESERVE_BYTES = 768 * MiB    # allocator slack, cuBLAS/attention workspaces, small tensors
PREFETCH_BLOCKS = 2                  # streamed blocks copied ahead on CUDA (one is enough on the CPU)

# -- DiT block activations (bytes per token and channel, see docs/runtime.md) ---------------------------
ATTN_ACT_WIDTHS = 5        # x, q, k, v, attention output in the activation dtype
ATTN_WORK_WIDTHS = 3       # float32 islands: modulated input, RoPE input and rotated copy (float64 in fp32 runs)
FFN_ACT_WIDTHS = 2         # x and the modulated FFN input in the activation dtype
FFN_WORK_WIDTHS = 2        # norm2 output and its modulated copy in float32
FFN_HIDDEN_COPIES = 2      # the FFN hidden before and after GELU
DEQUANT_COPIES = 2         # an fp8 Linear's weight cast to the activation dtype, then scaled
GGUF_DEQUANT_F32_COPIES = 3  # a GGUF Linear's weight while dequantised: codes, scaled codes, result (float32)
CONTEXT_TOKENS_IMAGE = 257  # CLIP tokens beside the text_len text tokens
ACTIVATION_SAFETY = 1.15   # fragmentation of the caching allocator

# -- VAE decode ---------------------------------------------------------------------------------------
# Full-resolution (channels × 4 frames × H × W, float32) feature maps alive at once while one latent frame
# decodes. benchmarks/census.py measures the decode's peak on fake tensors at 11.22 such maps (480p and 720p
# alike: the last stage's maps, its causal caches and the upsampled input); rounded up to a whole map so
# the plan stays above it with the allocator's rounding.
VAE_DECODE_LIVE_TENSORS = 12
VAE_TEMPORAL_STRIDE = 4        # video frames decoded per latent frame
VAE_SPATIAL_STRIDE = 8         # output pixels per latent pixel
VAE_TILE_OVERLAP = 8           # latent pixels shared by neighbouring tiles (blended)
VAE_MIN_TILE = 8               # smallest tile side in latent pixels
VAE_MAX_WORK = 1.3             # decoded latent area over the frame's, at most (overlaps cost decode work)


@dataclass(frozen=True)
class JobShape:
    """What sizes activations: tokens of one window and its output frame size, and guidance calls per step.

    In a multi-process run a rank plans for its share (`runtime.plan.job_on_rank`): `calls_per_step` are the
    calls its guidance group computes and `sequence_ranks` the ranks that split each call's tokens.
    `teacache`: TeaCache keeps one block-stack residual per guidance call between steps."""

    height: int
    width: int
    latent_frames: int
    tokens: int
    calls_per_step: int
    sequence_ranks: int = 1
    teacache: bool = False

    @property
    def local_tokens(self) -> int:
        """Tokens this rank holds (its shard, padded like ops/parallel.py `SequenceGroup.padded`)."""
        return -(-self.tokens // max(1, self.sequence_ranks))

    @classmethod
    def for_window(cls, height: int, width: int, frame_num: int, calls_per_step: int,
                   patch: Sequence[int] = (1, 2, 2), teacache: bool = False) -> "JobShape":
        """Output `height`×`width` pixels, `frame_num` video frames per window (4n+1)."""
        latent_frames = (frame_num - 1) // VAE_TEMPORAL_STRIDE + 1
        lh, lw = height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE
        tokens = (latent_frames // patch[0]) * (lh // patch[1]) * (lw // patch[2])
        return cls(height, width, latent_frames, tokens, calls_per_step, teacache=teacache)


@dataclass(frozen=True)
class DiTWeights:
    """Byte sizes of a DiT as it sits in memory (storage dtypes after loading), plus the widths that size
    its activations. `block_bytes[i]`: every tensor of `blocks.i` (LoRA tensors included)."""

    dim: int
    ffn_dim: int
    text_len: int
    block_bytes: tuple[int, ...]
    other_bytes: int
    largest_fp8_linear: int = 0   # elements of the largest fp8 Linear weight dequantised per call
    largest_gguf_linear: int = 0  # elements of the largest GGUF-packed Linear weight (dequantised per call)
    fp8_matmul: bool = False      # some fp8 Linears multiply in e4m3 (`_scaled_mm`): no weight copy, a workspace

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + sum(self.block_bytes)


@dataclass(frozen=True)
class Placement:
    """The decision for one job under one budget (None = unlimited: everything resident)."""

    budget: int | None
    num_blocks: int
    streamed: tuple[int, ...] = ()
    prefetch: int = 0
    max_guidance_batch: int = 1
    dit_peak: int = 0
    vae_peak: int = 0
    vae_tile: tuple[int, int, int] | None = None
    fits: bool = True
    reasons: tuple[str, ...] = field(default=())

    @property
    def resident_blocks(self) -> int:
        return self.num_blocks - len(self.streamed)

    @property
    def streaming(self) -> bool:
        return bool(self.streamed)


def auto_budget_bytes(free_bytes: int) -> int:
    """The automatic budget: the device's free memory minus AUTO_MARGIN_BYTES."""
    return max(0, int(free_bytes) - AUTO_MARGIN_BYTES)


def dit_activation_bytes(w: DiTWeights, tokens: int, batch: int, act_bytes: int) -> int:
    """Peak activation bytes of one DiT block call on `batch` stacked guidance branches of `tokens` tokens
    each (a rank's shard in sequence parallelism: the all-to-all exchanges keep the same bytes), the larger
    of the attention and the FFN phase, plus the text/image context and the temporaries of dequantising the
    largest fp8 or GGUF Linear weight (an fp8 Linear on `_scaled_mm` makes no weight copy: its largest call,
    the FFN's second Linear, holds an e4m3 copy of its input instead, models/layers.py)."""
    work = 8 if act_bytes >= 4 else 4
    ld = batch * tokens * w.dim
    attn = ld * (ATTN_ACT_WIDTHS * act_bytes + ATTN_WORK_WIDTHS * work)
    ffn = ld * (FFN_ACT_WIDTHS * act_bytes + FFN_WORK_WIDTHS * work) + \
        FFN_HIDDEN_COPIES * batch * tokens * w.ffn_dim * act_bytes
    context = 3 * batch * (w.text_len + CONTEXT_TOKENS_IMAGE) * w.dim * act_bytes
    dequant = max(DEQUANT_COPIES * w.largest_fp8_linear * act_bytes,
                  w.largest_gguf_linear * (GGUF_DEQUANT_F32_COPIES * 4 + act_bytes),
                  fp8_matmul_workspace_bytes(batch * tokens, w.ffn_dim) if w.fp8_matmul else 0)
    return int((max(attn, ffn) + context + dequant) * ACTIVATION_SAFETY)


def teacache_bytes(w: DiTWeights, job: JobShape, act_bytes: int) -> int:
    """TeaCache's residuals, held for the whole window (and its decode): one `[tokens, dim]` per call."""
    return job.calls_per_step * job.local_tokens * w.dim * act_bytes if job.teacache else 0


def vae_decode_bytes(height: int, width: int, channels: int) -> int:
    """Activation bytes of decoding one latent frame of `height`×`width` output pixels (float32), where
    `channels` is the width of the decoder's last (full-resolution) stage (96 for the Wan2.1 VAE)."""
    return VAE_DECODE_LIVE_TENSORS * channels * VAE_TEMPORAL_STRIDE * height * width * 4


def spread_indices(n: int, total: int) -> tuple[int, ...]:
    """`n` of `total` block indices spread evenly (a streamed block's copy hides behind the resident
    blocks before it)."""
    if n <= 0:
        return ()
    return tuple(i for i in range(total) if (i + 1) * n // total > i * n // total)


def _dit_peak(w: DiTWeights, streamed: tuple[int, ...], prefetch: int, act: int, fixed: int) -> int:
    resident = w.other_bytes + sum(b for i, b in enumerate(w.block_bytes) if i not in streamed)
    buffers = min(len(streamed), prefetch + 1) * max((w.block_bytes[i] for i in streamed), default=0)
    return resident + buffers + act + fixed


def decide_placement(w: DiTWeights, job: JobShape, budget: int | None, *, act_bytes: int, vae_bytes: int = 0,
                     vae_channels: int = 96, batch_guidance: bool = True, prefetch: int = PREFETCH_BLOCKS
                     ) -> Placement:
    """Resident blocks first, then guidance batching, then VAE tiles: the fewest streamed blocks for which
    one step fits with one call at a time; all calls batched only when that fits with nothing streamed.

    `vae_bytes`: VAE weights (they stay on the device). The result says `fits=False` (with reasons) when
    even streaming every block, or the smallest VAE tile, does not fit.
    """
    n = len(w.block_bytes)
    calls = max(1, job.calls_per_step)
    fixed = vae_bytes + RUNTIME_RESERVE_BYTES + teacache_bytes(w, job, act_bytes)

    def act(batch: int) -> int:
        return dit_activation_bytes(w, job.local_tokens, batch, act_bytes)

    full_decode = vae_decode_bytes(job.height, job.width, vae_channels)
    if budget is None:
        batch = calls if batch_guidance else 1
        return Placement(None, n, (), 0, batch, _dit_peak(w, (), 0, act(batch), fixed),
                         w.total_bytes + fixed + full_decode)

    streamed: tuple[int, ...] = ()
    batch = 1
    if batch_guidance and calls > 1 and _dit_peak(w, (), prefetch, act(calls), fixed) <= budget:
        batch = calls
    else:
        for k in range(n + 1):
            streamed = spread_indices(k, n)
            if _dit_peak(w, streamed, prefetch, act(1), fixed) <= budget:
                break
        if batch_guidance:
            batch = max((b for b in range(1, calls + 1)
                         if _dit_peak(w, streamed, prefetch, act(b), fixed) <= budget), default=1)
    dit_peak = _dit_peak(w, streamed, prefetch, act(batch), fixed)
    reasons = []
    if dit_peak > budget:
        reasons.append(f"a DiT step needs {dit_peak / GiB:.1f} GiB even with all {n} blocks streamed")
    placement = Placement(budget, n, streamed, prefetch if streamed else 0, batch, dit_peak)

    # VAE decode: the DiT's resident weights and stream buffers stay where they are
    held = _dit_peak(w, streamed, prefetch, 0, fixed)
    vae_peak, tile = held + full_decode, None
    if vae_peak > budget:
        tile, vae_peak = _vae_tile(job, budget - held, vae_channels)
        vae_peak += held
        if tile is None:
            reasons.append(f"a VAE decode needs {vae_peak / GiB:.1f} GiB even in "
                           f"{VAE_MIN_TILE}×{VAE_MIN_TILE}-latent-pixel tiles")
    return replace(placement, vae_peak=vae_peak, vae_tile=tile, fits=not reasons, reasons=tuple(reasons))


def _vae_tile(job: JobShape, room: int, channels: int) -> tuple[tuple[int, int, int] | None, int]:
    """The tile (latent pixels) of the fewest equal tiles whose decode fits in `room` bytes, and its cost.

    The tile count per axis comes first and the tiles share the axis equally (overlaps included), so no
    end-aligned extra tile is decoded; the overlap is the largest up to VAE_TILE_OVERLAP that keeps the
    decoded area within VAE_MAX_WORK of the frame's. Ties: the larger overlap, then the less work."""
    lh, lw = job.height // VAE_SPATIAL_STRIDE, job.width // VAE_SPATIAL_STRIDE
    best = None
    for nh in range(1, _max_tiles(lh) + 1):
        for nw in range(1, _max_tiles(lw) + 1):
            for ov in range(VAE_TILE_OVERLAP if nh * nw > 1 else 0, -1, -1):
                th, tw = _tile_side(lh, nh, ov), _tile_side(lw, nw, ov)
                if ov and ov >= min(th, tw) // 2:
                    continue   # an overlap wider than half a tile blends more than it decodes
                work = vae_tile_work(lh, lw, (th, tw, ov))
                cost = vae_decode_bytes(th * VAE_SPATIAL_STRIDE, tw * VAE_SPATIAL_STRIDE, channels)
                if work <= VAE_MAX_WORK and cost <= room:
                    key = (nh * nw, -ov, work)
                    if best is None or key < best[0]:
                        best = key, (th, tw, ov), cost
                    break
    if best is not None:
        return best[1], best[2]
    smallest = min(VAE_MIN_TILE, lh) * VAE_SPATIAL_STRIDE, min(VAE_MIN_TILE, lw) * VAE_SPATIAL_STRIDE
    return None, vae_decode_bytes(*smallest, channels)


def _max_tiles(size: int) -> int:
    """Most tiles along an axis of `size` latent pixels (each at least VAE_MIN_TILE wide)."""
    return max(1, size // VAE_MIN_TILE)


def _tile_side(size: int, count: int, overlap: int) -> int:
    """The side of `count` equal tiles covering `size` with neighbours sharing `overlap` pixels."""
    return size if count <= 1 else -(-(size + (count - 1) * overlap) // count)


def tile_spans(size: int, tile: int, overlap: int) -> int:
    """How many tiles `WanVAE`'s tiling decodes along an axis (models/vae.py `_spans`: stride tile − overlap,
    the last tile aligned to the end)."""
    return 1 if tile >= size else -(-(size - tile) // (tile - overlap)) + 1


def vae_tile_work(lh: int, lw: int, tile: tuple[int, int, int]) -> float:
    """Latent pixels decoded with `tile` over the frame's `lh`×`lw` (1.0 = no overlap, no extra tile)."""
    th, tw, ov = tile
    return (tile_spans(lh, th, ov) * min(th, lh)) * (tile_spans(lw, tw, ov) * min(tw, lw)) / (lh * lw)


def ceil_gib(n: int) -> float:
    """Bytes as GiB rounded up to 0.1 (what a user should pass to --vram)."""
    return math.ceil(n / GiB * 10) / 10
