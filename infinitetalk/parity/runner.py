"""Loads a golden case, runs our implementation on it, writes and scores the outputs."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# component kind -> module under infinitetalk.parity.kinds exposing run(case) -> Outputs
KINDS: dict[str, str] = {
    "dit": "dit",
    "wav2vec2": "wav2vec2",
    "vae_encode": "vae",
    "vae_decode": "vae",
    "t5": "t5",
    "clip_vision": "clip_vision",
    "timesteps": "loop",
    "chunk_plan": "loop",
    "audio_windows": "loop",
    "color_match": "loop",
}


@dataclass
class Case:
    """One golden case folder (case.json + safetensors files)."""

    dir: Path
    component: str
    config: dict[str, Any]
    call: dict[str, Any]
    tolerance: float
    expected_json: dict[str, Any] | None = None

    @classmethod
    def load(cls, case_dir: str | Path) -> "Case":
        d = Path(case_dir)
        spec = json.loads((d / "case.json").read_text())
        return cls(
            dir=d,
            component=spec["component"],
            config=spec.get("config") or {},
            call=spec.get("call") or {},
            tolerance=float((spec.get("tolerance") or {}).get("rel_l2", 0.0)),
            expected_json=spec.get("expected_json"),
        )

    @property
    def weights_path(self) -> Path:
        return self.dir / "weights.safetensors"

    def inputs(self) -> dict[str, torch.Tensor]:
        p = self.dir / "inputs.safetensors"
        return load_file(str(p)) if p.exists() else {}

    def expected(self) -> dict[str, torch.Tensor]:
        p = self.dir / "expected.safetensors"
        return load_file(str(p)) if p.exists() else {}


@dataclass
class Outputs:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    json: dict[str, Any] | None = None


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = torch.linalg.vector_norm(ref64)
    num = torch.linalg.vector_norm(out64 - ref64)
    if denom == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / denom)


def compute(case: Case) -> Outputs:
    if case.component not in KINDS:
        raise ValueError(f"unknown component kind {case.component!r}; known: {', '.join(sorted(KINDS))}")
    module = importlib.import_module(f"{__package__}.kinds.{KINDS[case.component]}")
    with torch.inference_mode():
        return module.run(case)


def score(case: Case, outputs: Outputs) -> tuple[bool, list[str]]:
    """Compare outputs with the case's expectations; returns (all_ok, report lines)."""
    ok, lines = True, []
    for name, ref in case.expected().items():
        out = outputs.tensors.get(name)
        if out is None:
            ok = False
            lines.append(f"{name}: MISSING")
            continue
        if tuple(out.shape) != tuple(ref.shape):
            ok = False
            lines.append(f"{name}: SHAPE {tuple(out.shape)} != expected {tuple(ref.shape)}")
            continue
        err = rel_l2(out, ref)
        good = err <= case.tolerance
        ok &= good
        lines.append(f"{name}: rel_l2={err:.3e} (tol {case.tolerance:.0e}) {'ok' if good else 'FAIL'}")
    if case.expected_json is not None:
        got = outputs.json or {}
        for key, want in case.expected_json.items():
            good = key in got and got[key] == want
            ok &= good
            lines.append(f"{key}: {'equal' if good else 'DIFFERS'} (json)")
    return ok, lines


def write_outputs(case: Case, outputs: Outputs, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in outputs.tensors.items()}
    if tensors:
        save_file(tensors, str(out_dir / "outputs.safetensors"), metadata={"format": "pt"})
    if case.expected_json is not None or outputs.json is not None:
        (out_dir / "outputs.json").write_text(json.dumps(outputs.json or {}, indent=1))


def run_case(case_dir: str | Path, out_dir: str | Path) -> tuple[bool, list[str]]:
    case = Case.load(case_dir)
    outputs = compute(case)
    write_outputs(case, outputs, Path(out_dir))
    return score(case, outputs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infinitetalk.parity", description=__doc__)
    ap.add_argument("case_dir", help="golden case folder (holds case.json)")
    ap.add_argument("--out", required=True, help="folder to write outputs.safetensors / outputs.json into")
    args = ap.parse_args(argv)
    try:
        ok, lines = run_case(args.case_dir, args.out)
    except Exception as exc:  # noqa: BLE001 - report any failure to run as exit code 2
        print(f"could not run case {args.case_dir}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0 if ok else 1
