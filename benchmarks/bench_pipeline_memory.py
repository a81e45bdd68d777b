"""Peak host memory (RSS) of a whole job vs. audio length, with the tiny models on the CPU.

The long-video loop must hold one window at a time (decode streamed into per-window segments, no
whole-video tensor), so the peak should stay flat as the audio grows. Each length runs in a fresh
subprocess; its peak RSS comes from getrusage.

    python benchmarks/bench_pipeline_memory.py                  # 6 s vs 60 s, target ratio <= 1.2
    python benchmarks/bench_pipeline_memory.py --seconds 6 30 120 --size-scale 0.2
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> None:
    from infinitetalk.audio.io import write_wav
    from infinitetalk.demo import synthetic_voice, two_faces_image, write_png
    from infinitetalk.pipeline.generate import generate
    from infinitetalk.pipeline.models import load_models
    from infinitetalk.pipeline.request import GenerationRequest

    work = Path(args.work)
    half = args.seconds / 2
    left = write_wav(work / f"left_{args.seconds}.wav", synthetic_voice(half, 120.0, seed=1)[None], 24000)
    right = write_wav(work / f"right_{args.seconds}.wav", synthetic_voice(half, 210.0, seed=2)[None], 24000)
    image = write_png(work / "two.png", two_faces_image())
    models = load_models(args.models, device="cpu", dtype="fp32")
    rss_models = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    req = GenerationRequest(left_audio=left, right_audio=right, image=image, out=work / f"out_{args.seconds}.mp4",
                            order="left_right", seed=0, steps=args.steps, size_scale=args.size_scale)
    t0 = time.perf_counter()
    result = generate(req, models)
    print(json.dumps({
        "seconds": args.seconds, "frames": result.frames, "windows": result.windows,
        "size": [result.height, result.width], "elapsed_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_load_mb": round(rss_models, 1),
    }))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, nargs="+", default=[6.0, 60.0])
    ap.add_argument("--size-scale", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--models", default=None, help="tiny models folder (default: made in a temp folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.seconds = args.seconds[0]
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        models = args.models
        if models is None:
            from infinitetalk.tiny import make_tiny_models

            models = str(Path(tmp) / "models")
            make_tiny_models(models)
        rows = []
        for s in args.seconds:
            out = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(s), "--models", models,
                                  "--work", tmp, "--size-scale", str(args.size_scale), "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["peak_rss_mb"]
    print("\n| audio s | frames | windows | size | peak RSS MB | after model load MB | x first | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seconds']:g} | {r['frames']} | {r['windows']} | {r['size'][0]}x{r['size'][1]} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb'] / base:.2f} | {r['elapsed_s']} |")
    ratio = rows[-1]["peak_rss_mb"] / base
    print(f"\nlongest/shortest peak RSS ratio {ratio:.2f} (target <= 1.2): {'OK' if ratio <= 1.2 else 'NOT FLAT'}")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
