"""Every golden case (folder named by INFINITETALK_GOLDEN_DIR) passes through the parity runner, judged from its files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN, GOLDEN_MISSING, ROOT, golden_cases
from infinitetalk.parity.runner import Case, rel_l2

CASES = golden_cases()


@pytest.mark.skipif(GOLDEN is None or not GOLDEN.is_dir(), reason=GOLDEN_MISSING)
def test_golden_folder_has_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: p.name)
def test_golden_case(case_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "infinitetalk.parity", str(case_dir), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stderr
    case = Case.load(case_dir)
    expected = case.expected()
    if expected:
        outs = load_file(str(tmp_path / "outputs.safetensors"))
        for name, ref in expected.items():
            assert name in outs, f"{name} missing from outputs"
            assert outs[name].shape == ref.shape
            assert outs[name].dtype == torch.float32
            err = rel_l2(outs[name], ref)
            assert err <= case.tolerance, f"{name}: rel_l2 {err:.3e} > {case.tolerance:.0e}"
    if case.expected_json is not None:
        got = json.loads((tmp_path / "outputs.json").read_text())
        for key, want in case.expected_json.items():
            assert got.get(key) == want, key
    assert proc.returncode == 0, proc.stdout
