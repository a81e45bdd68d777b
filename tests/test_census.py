"""benchmarks/census.py: the fake-tensor census runs and its roofline model groups kernels as documented."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import census  # noqa: E402


def test_smoke_json_has_the_headline_keys():
    proc = subprocess.run([sys.executable, "benchmarks/census.py", "--smoke", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["modelled"] is True and result["ceilings"]["bf16_flops"] == 798e12
    for key in ("fast_dit_call_s", "fast_s_per_video_second", "turbo_s_per_video_second"):
        assert result[key] > 0, key
    configs = {(r["weights"], r["execution"], r["attention"]) for r in result["rows"]}
    assert len(configs) == 3 * 3 * len(census.ATTENTION_RATE)
    assert all(r["dit_call_s"] > 0 and r["activation_peak_bytes"] > 0 for r in result["rows"])
    assert result["vae"]["flops"] > 0 and result["dit_call_flops"] > 0
    compared = result["plan_vs_measured"]
    assert set(compared) == {"dit bf16", "dit fp8 dequantised", "dit fp8 _scaled_mm", "vae decode"}
    assert all(r["measured_bytes"] > 0 and r["plan_bytes"] > 0 for r in compared.values())


def _op(name, reads, writes, island=None, flops=0):
    return census.Op(name, flops, tuple(reads), tuple(writes), "x.py:1", census.CEILINGS["fp32_flops"], True, island)


def test_fusion_model_counts_only_what_crosses_a_kernel():
    mb = 2**20
    ops = [_op("mm", [(1, mb), (2, mb)], [(3, mb)], flops=10**9),       # heavy
           _op("mul", [(3, mb)], [(4, 4 * mb)], island=0),              # island: reads 3 ...
           _op("add", [(4, 4 * mb)], [(5, mb)], island=0),              # ... writes 5 only
           _op("mm", [(5, mb), (2, mb)], [(6, mb)], flops=10**9)]
    eager = census.kernels(ops, "eager")
    fused = census.kernels(ops, "fused")
    compiled = census.kernels(ops, "compiled")
    assert len(eager) == 4 and len(fused) == 3 and len(compiled) == 3
    assert fused[1][0] == [1, 2] and fused[1][1].nbytes == 2 * mb   # the 4 MiB float32 temporary never moves
    assert sum(k.nbytes for _, k in eager) - sum(k.nbytes for _, k in fused) == 8 * mb
    assert census.seconds(ops, "fused") < census.seconds(ops, "eager")


@pytest.mark.parametrize("latent", [(2, 60, 104), (3, 90, 160), (2, 8, 8)])   # 480p, 720p, a small tile
def test_vae_decode_plan_covers_the_census_peak(latent):
    """The plan's VAE decode estimate (runtime/budget.py, calibrated on this census) is not below the
    fake-tensor peak of decoding a window of that size, and not far above it."""
    from infinitetalk.runtime.budget import vae_decode_bytes

    _, peak = census.trace_vae(latent)
    plan = vae_decode_bytes(latent[1] * 8, latent[2] * 8, 96)
    assert peak <= plan <= 1.15 * peak, (peak, plan)
