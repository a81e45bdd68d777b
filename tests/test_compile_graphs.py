"""--compile over a whole multi-window job: one block graph per kind of call, shared by every block (streamed
ones included), never a recompile loop into Dynamo's limit; an unexpected graph is logged with its cause."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from _dit_testutil import random_inputs, random_model, small_config
from infinitetalk.ops.options import RuntimeOptions
from infinitetalk.runtime.kernels import configure_dit
from infinitetalk.runtime.streaming import BlockStreamer

pytestmark = pytest.mark.slow   # dynamo + inductor on 2 cores


def _job(model, cfg, batched: bool, windows: int = 2, steps=(900.0, 500.0)) -> list[torch.Tensor]:
    """The DiT calls of a `fast` job: per window and step, cond (two speakers) + drop-audio (one silent
    speaker), batched into one call or one after the other; new latents, timesteps and audio every window."""
    outs = []
    with torch.no_grad():
        for window in range(windows):
            inp = random_inputs(cfg, persons=2, seed=window + 1)
            silent = torch.zeros_like(inp["audio"][-1:])
            common = dict(clip_fea=inp["clip_fea"], y=inp["y"], ref_target_masks=inp["ref_target_masks"])
            for t in steps:
                t = torch.tensor([t])
                if batched:
                    outs.append(model.forward_batch(inp["x"], t, [inp["context"]] * 2, audios=[inp["audio"], silent],
                                                    **common))
                else:
                    outs += [model(inp["x"], t, inp["context"], audio=a, **common) for a in (inp["audio"], silent)]
    return outs


def _compiled(cfg, backend):
    torch._dynamo.reset()
    model = random_model(cfg, dtype=torch.bfloat16)
    eager = model
    configure_dit(model, RuntimeOptions(compile=True), "cpu", compile_backend=backend)
    streamer = BlockStreamer(model.blocks, [1], "cpu").install()   # block 1 visits per call, like a 12 GB budget
    return eager, streamer


def test_one_inductor_graph_for_a_batched_job_with_streaming():
    cfg = small_config(num_layers=3)
    want = _job(random_model(cfg, dtype=torch.bfloat16), cfg, batched=True)
    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    model, streamer = _compiled(cfg, inductor)
    got = _job(model, cfg, batched=True)
    assert streamer.copies >= 4   # the streamed block really moved every call
    assert len(graphs) == 1, [g.code[:300] for g in graphs]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=3e-2, atol=3e-2)
    torch._dynamo.reset()


def test_unbatched_guidance_adds_exactly_one_graph_and_says_why(caplog):
    cfg = small_config(num_layers=3)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model, _ = _compiled(cfg, counting)
    with caplog.at_level("WARNING", logger="infinitetalk.runtime.kernels"):
        _job(model, cfg, batched=False)
    assert len(graphs) == 2   # two-speaker call, one-speaker call: for every block, every window, every step
    (record,) = [r for r in caplog.records if "new DiT block graph" in r.getMessage()]
    assert "audio" in record.getMessage()   # the cause: the silent call's audio tokens
    torch._dynamo.reset()
