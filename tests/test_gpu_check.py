"""benchmarks/gpu_check.py --smoke: the GPU check's own code, run on the CPU at tiny size (CI has no GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infinitetalk.ops.options import ATTENTION_CHOICES

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path),
                           "--deadline", "400"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = data["sections"]
    assert list(sections) == ["env", "dit", "vae", "e2e", "turbo", "attention", "fp8", "budget", "agreement",
                              "compile"]                       # the default path first, e2e before the extras
    for name, result in sections.items():
        assert "error" not in result and "skipped" not in result, (name, result)
    assert set(sections["dit"]) >= {"default_480p", "default_720p"}
    assert "fp8_matmul_layers=0" in sections["dit"]["kernels"]           # the default path is not fp8
    # the budget section streams blocks when the budget is below the model (tiny budgets stream every block)
    budget = sections["budget"]
    assert budget["unlimited"]["streamed_blocks"] == 0
    streamed = [row for key, row in budget.items() if key.endswith("GB")]
    assert streamed and all(row["streamed_blocks"] == row["of"] for row in streamed)
    assert all(row["streamed_bytes"] <= row["pinned_host_bytes"] for row in streamed)
    assert set(sections["attention"]) >= set(ATTENTION_CHOICES)
    agreement = sections["agreement"]
    assert agreement["ok"] is True and agreement["tf32"] is False
    e2e, turbo = sections["e2e"], sections["turbo"]
    assert e2e["s_per_video_second"] > 0 and e2e["dit_passes"] == e2e["steps"]   # both calls in one pass
    assert turbo["dit_passes"] == turbo["steps"] and turbo["calls_per_step"] == 1 and turbo["one_call_per_step"]
    compiled = sections["compile"]
    assert 1 <= compiled["graphs"] <= compiled["blocks"] and compiled["s_per_call"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| budget | unlimited |" in table and "| e2e | s_per_video_second |" in table
