"""CPU time of the wav2vec2 audio pass with the real chinese-wav2vec2-base sizes (random weights).

    python3 benchmarks/bench_wav2vec2.py [--seconds 60] [--threads N] [--repeat 2]

Reports wall and process-CPU time of `encode_audio` (normalise + CNN front end + 25 fps transformer),
the wall time of the CNN front end alone, the machine's load average (other processes skew wall time)
and the peak resident memory of the process.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinitetalk.checkpoints.materialize import build_on_meta, load_module  # noqa: E402
from infinitetalk.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder, encode_audio, normalize_waveform  # noqa: E402
from infinitetalk.tiny.layouts import random_state_dict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Wav2Vec2Config()  # hidden 768, 12 layers, 12 heads, ffn 3072, conv 512 x 7
    model = build_on_meta(lambda: Wav2Vec2Encoder(cfg))
    model = load_module(model, random_state_dict(model, seed=0), dtype=torch.float32)
    samples = torch.randn(int(args.seconds * 16000), generator=torch.Generator().manual_seed(0)) * 0.1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seconds:g} s of audio")
    for i in range(args.repeat):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.feature_extractor(normalize_waveform(samples))
        t1, c1 = time.perf_counter(), time.process_time()
        out = encode_audio(model, samples)
        t2, c2 = time.perf_counter(), time.process_time()
        print(f"run {i}: encode_audio {t2 - t1:.2f} s wall, {c2 - c1:.2f} s CPU (CNN front end alone "
              f"{t1 - t0:.2f} s wall) -> {tuple(out.shape)}; load average {os.getloadavg()[0]:.1f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
