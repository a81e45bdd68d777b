"""Command line: `python -m infinitetalk {generate,demo,make-tiny-models} ...`."""
from __future__ import annotations

import argparse
from pathlib import Path


def _make_tiny_models(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_models

    files = make_tiny_models(Path(args.dir), seed=args.seed)
    for f in files:
        print(f)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m infinitetalk", description="InfiniteTalk Multi: two-person lip-synced video.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-tiny-models", help="write random tiny checkpoints (every real layout) into a ComfyUI-style models folder")
    p.add_argument("dir", help="models folder to create/fill (diffusion_models/, model_patches/, loras/, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
