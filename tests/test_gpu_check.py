"""benchmarks/gpu_check.py --smoke: the GPU check's own code, run on the CPU at tiny size (CI has no GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path),
                           "--deadline", "400"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = data["sections"]
    assert set(sections) == {"env", "dit", "budget", "vae", "e2e", "e2e_turbo", "agreement"}
    for name, result in sections.items():
        assert "error" not in result and "skipped" not in result, (name, result)
    # the budget section streams blocks when the budget is below the model (tiny budgets stream every block)
    budget = sections["budget"]
    assert budget["unlimited"]["streamed_blocks"] == 0
    assert all(row["streamed_blocks"] == row["of"] for key, row in budget.items() if key.endswith("GB"))
    assert sections["agreement"]["ok"] is True
    assert sections["e2e"]["s_per_video_second"] > 0
    assert (sections["e2e"]["calls_per_step"], sections["e2e_turbo"]["calls_per_step"]) == (2, 1)   # fast, turbo
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| budget | unlimited |" in table and "| e2e | s_per_video_second |" in table
