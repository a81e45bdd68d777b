"""ops.fused: the DiT's float32 islands, eager and compiled (inductor on CPU), keep the reference's maths."""
from __future__ import annotations

import pytest
import torch

from _dit_testutil import random_inputs, random_model, small_config
from infinitetalk.ops import fused
from infinitetalk.ops.options import RuntimeOptions
from infinitetalk.runtime.kernels import configure_dit

G = torch.Generator().manual_seed(5)


@pytest.fixture(autouse=True)
def _eager_afterwards():
    yield
    fused.enable_fusion(False)


def test_chunked_quantisation_equals_one_pass(monkeypatch):
    x = (torch.randn(37, 48, generator=G) * 3).to(torch.bfloat16)
    scale = x.float().abs().amax() / 448
    whole = fused._quantize_e4m3(x, scale)
    monkeypatch.setattr(fused, "QUANTIZE_CHUNK", 5 * 48)   # 5 rows at a time, a short last chunk
    chunked = fused.quantize_e4m3(x, scale)
    assert chunked.dtype == torch.float8_e4m3fn
    assert torch.equal(chunked.view(torch.uint8), whole.view(torch.uint8))


def test_observer_sees_each_island_call():
    seen = []
    x = torch.randn(2, 5, 8, generator=G)
    with fused.observe(lambda island, run, args: seen.append(island.name) or run(*args)):
        fused.gated_residual(x, x, torch.ones(1, 1, 8))
        fused.rms_norm(x, torch.ones(8), 1e-6)
    assert seen == ["gated_residual", "rms_norm"]


def test_an_island_whose_compiler_fails_runs_eager(caplog):
    def broken(fn):
        def run(*args):
            raise RuntimeError("triton: no working compiler")
        return run

    fused.enable_fusion(True, compiler=broken)
    x = torch.randn(2, 5, 8, generator=G)
    with caplog.at_level("WARNING"):
        got = fused.rms_norm(x, torch.ones(8), 1e-6)
        fused.rms_norm(x, torch.ones(8), 1e-6)
    assert torch.equal(got, fused.rms_norm.fn(x, torch.ones(8), 1e-6))
    assert fused.rms_norm.compiled is None and fused.gated_residual.compiled is not None
    assert sum("rms_norm: compiling failed" in r.getMessage() for r in caplog.records) == 1


def test_fuse_option_is_off_on_cpu_by_default():
    model = random_model(small_config(num_layers=1))
    assert not configure_dit(model, RuntimeOptions(), "cpu").fused_islands
    assert not fused.fusion_enabled()
    with pytest.raises(ValueError, match="fuse"):
        RuntimeOptions(fuse="yes")


@pytest.mark.slow
def test_compiled_islands_give_the_eager_bf16_result():
    """Each island compiled by inductor (one kernel each) = the eager chain, bit for bit in bf16 (the bf16
    roundings inside an island are kept), over a two-speaker DiT call and two token counts."""
    cfg = small_config(num_layers=1)
    model = random_model(cfg, dtype=torch.bfloat16)
    calls = [random_inputs(cfg, persons=2, seed=s, frames=f) for s, f in ((1, 3), (2, 2))]
    eager = [model(**inputs) for inputs in calls]
    assert configure_dit(model, RuntimeOptions(fuse="on"), "cpu").fused_islands and fused.fusion_enabled()
    for inputs, want in zip(calls, eager):
        torch.testing.assert_close(model(**inputs), want, atol=0, rtol=0)
