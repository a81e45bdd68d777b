"""Peak host memory of `load_dit` relative to the checkpoint size (target: peak RSS <= 1.2 x file size).

Writes a synthetic mid-size DiT (default dim 2048, 24 layers: ~3 GB bf16 base + InfiniteTalk patch), an
fp8-scaled variant and a rank-64 LoRA on every block linear (merged at load) into a temporary folder, streaming tensor by tensor (the writer never holds the
model), then loads each with `load_dit(..., device="cpu")` in a fresh subprocess and reports the peak
resident set size (`ru_maxrss`), also net of the RSS after importing torch + the package (the baseline). Files are deleted
afterwards unless --keep.

    python3 benchmarks/bench_load_memory.py [--dim 2048 --layers 24 --ffn 5120 --dir /big/tmp]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infinitetalk.checkpoints.materialize import build_on_meta  # noqa: E402
from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT  # noqa: E402
from infinitetalk.tiny.dit import is_audio_key  # noqa: E402

_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def _stream_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str],
                        pool: torch.Tensor) -> None:
    """Write a safetensors file tensor by tensor; values are slices of a random pool (content is irrelevant)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype in specs:
            numel, start = math.prod(shape), 0
            while start < numel:
                take = min(numel - start, pool.numel())
                chunk = pool[:take]
                if name.endswith((".scale_weight", ".alpha")):
                    chunk = torch.full((take,), 1e-3 if name.endswith(".scale_weight") else 64.0)
                f.write(chunk.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
                start += take


def write_checkpoints(folder: Path, cfg: DiTConfig) -> dict[str, Path]:
    model = build_on_meta(lambda: InfiniteTalkDiT(cfg, compute_dtype=torch.bfloat16))
    state = model.state_dict()
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02
    meta = {"format": "pt", "infinitetalk.num_heads": str(cfg.num_heads), "infinitetalk.audio_layers": str(cfg.audio_layers)}
    base = [(k, tuple(v.shape), torch.bfloat16) for k, v in state.items() if not is_audio_key(k)]
    patch = [(k, tuple(v.shape), torch.bfloat16) for k, v in state.items() if is_audio_key(k)]
    fp8: list = []
    for name, shape, _ in base:
        if name in linears:
            fp8 += [(name, shape, torch.float8_e4m3fn), (name[: -len(".weight")] + ".scale_weight", (1,), torch.float32)]
        else:
            fp8.append((name, shape, torch.bfloat16))
    fp8.append(("scaled_fp8", (0,), torch.float8_e4m3fn))
    lora: list = []  # lightx2v-like: rank 64 on every block linear
    for name in sorted(linears):
        m, (out_f, in_f) = "diffusion_model." + name[: -len(".weight")], tuple(state[name].shape)
        lora += [(m + ".lora_down.weight", (64, in_f), torch.bfloat16), (m + ".lora_up.weight", (out_f, 64), torch.bfloat16),
                 (m + ".alpha", (), torch.float32)]
    paths = {"base_bf16": folder / "synthetic_i2v_bf16.safetensors", "base_fp8": folder / "synthetic_i2v_fp8_scaled.safetensors",
             "patch_bf16": folder / "synthetic_infinitetalk_bf16.safetensors", "lora": folder / "synthetic_lora_rank64.safetensors"}
    _stream_safetensors(paths["base_bf16"], base, meta, pool)
    _stream_safetensors(paths["base_fp8"], fp8, meta, pool)
    _stream_safetensors(paths["patch_bf16"], patch, meta, pool)
    _stream_safetensors(paths["lora"], lora, {"format": "pt"}, pool)
    return paths


_CHILD = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
from infinitetalk.loaders import load_dit
import infinitetalk.loaders.dit  # imports before the baseline
base_kb = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
t0 = time.perf_counter()
model = load_dit({base!r}, {patch!r}, loras={loras!r}, dtype=torch.bfloat16, device="cpu")
secs = time.perf_counter() - t0
tensors = list(model.state_dict().values())
nbytes = sum(t.numel() * t.element_size() for t in tensors)
for t in tensors:  # touch every weight page, as a forward pass would
    t.reshape(-1).view(torch.uint8).max()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(base_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, secs, nbytes,
      int(status["RssAnon"].split()[0]), int(status["RssFile"].split()[0]))
"""


def measure(base: Path, patch: Path, lora: Path | None = None) -> dict:
    loras = [(str(lora), 1.0)] if lora else []
    code = _CHILD.format(root=str(ROOT), base=str(base), patch=str(patch), loras=loras)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    base_kb, peak_kb, secs, nbytes, anon_kb, file_kb = int(out[0]), int(out[1]), float(out[2]), int(out[3]), int(out[4]), int(out[5])
    files = base.stat().st_size + patch.stat().st_size + (lora.stat().st_size if lora else 0)
    return {"files_gb": files / 1e9, "model_gb": nbytes / 1e9, "peak_rss_gb": peak_kb * 1024 / 1e9,
            "import_rss_gb": base_kb * 1024 / 1e9, "peak_over_files": peak_kb * 1024 / files,
            "net_peak_over_files": (peak_kb - base_kb) * 1024 / files, "load_s": secs,
            "rss_anon_gb": anon_kb * 1024 / 1e9, "rss_file_gb": file_kb * 1024 / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--ffn", type=int, default=5120)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: system temp)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    cfg = DiTConfig(dim=args.dim, ffn_dim=args.ffn, num_heads=args.dim // 128, num_layers=args.layers)
    folder = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        paths = write_checkpoints(folder, cfg)
        print(f"wrote synthetic checkpoints in {time.perf_counter() - t0:.1f}s: "
              + ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in paths.values()))
        for label, base, lora in (("bf16", paths["base_bf16"], None), ("fp8_scaled", paths["base_fp8"], None),
                                  ("bf16+lora", paths["base_bf16"], paths["lora"])):
            r = measure(base, paths["patch_bf16"], lora)
            print(f"{label:10s} files {r['files_gb']:.2f} GB, model {r['model_gb']:.2f} GB, peak RSS {r['peak_rss_gb']:.2f} GB "
                  f"({r['peak_over_files']:.2f}x files; {r['net_peak_over_files']:.2f}x net of the "
                  f"{r['import_rss_gb']:.2f} GB import baseline), load {r['load_s']:.1f}s; after load: "
                  f"anonymous {r['rss_anon_gb']:.2f} GB, file-backed {r['rss_file_gb']:.2f} GB")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
