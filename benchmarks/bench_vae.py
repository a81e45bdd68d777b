"""Wan2.1 VAE speed and peak memory with the REAL architecture (dim 96) and random weights.

Default: decode one 81-frame 640x640 window (latent 16x21x80x80) as the pipeline does, streaming the
frames out (each yielded chunk is dropped), on CUDA when available else CPU. `--encode` also times the
encode of an 81-frame clip (the pipeline encodes the conditioning clip once per window).
`--small` is a quick CPU run (latent 16x3x16x16 -> 9 frames of 128x128).

    python benchmarks/bench_vae.py [--small] [--device cpu|cuda] [--dtype fp32|bf16] [--tile 40,40,8] [--encode]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinitetalk.checkpoints.materialize import build_on_meta, load_module  # noqa: E402
from infinitetalk.models.vae import VAEConfig, WanVAE  # noqa: E402
from infinitetalk.tiny.layouts import random_state_dict  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="quick CPU size: latent 16x3x16x16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--latent", default="21,80,80", help="latent frames,height,width (default 21,80,80)")
    ap.add_argument("--tile", default=None, help="tile_h,tile_w,overlap in latent px (default: untiled)")
    ap.add_argument("--encode", action="store_true", help="also time encoding the matching video")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.small else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t, h, w = (3, 16, 16) if args.small else tuple(int(v) for v in args.latent.split(","))
    tile = tuple(int(v) for v in args.tile.split(",")) if args.tile else None

    cfg = VAEConfig()
    model = build_on_meta(lambda: WanVAE(cfg))
    model = load_module(model, random_state_dict(model, seed=0), dtype=dtype, device=device, source="random")
    latent = torch.randn(cfg.z_dim, t, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    _sync(device)
    start = time.perf_counter()
    frames, first = 0, None
    for chunk in model.decode_stream(latent, tile=tile):
        frames += chunk.shape[1]
        if first is None:
            _sync(device)
            first = time.perf_counter() - start
        del chunk
    _sync(device)
    decode_s = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "dtype": args.dtype, "latent": [cfg.z_dim, t, h, w], "frames": frames, "size": [h * 8, w * 8],
        "tile": tile, "weights_mib": round(weights_mib, 1),
        "decode_s": round(decode_s, 3), "decode_first_frame_s": round(first or 0.0, 3),
        "decode_s_per_frame": round(decode_s / max(frames, 1), 4),
        "decode_peak_mib": round(_peak_mib(device), 1),
    }
    if args.encode:
        video = torch.rand(3, frames, h * 8, w * 8, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        model.encode(video, tile=tile)
        _sync(device)
        result["encode_s"] = round(time.perf_counter() - start, 3)
        result["encode_peak_mib"] = round(_peak_mib(device), 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
