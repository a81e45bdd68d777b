"""Block streaming on the CPU (the same code path as CUDA without streams): streamed and resident DiT give
the same output, every tensor a block owns (fp8 weight + scale, LoRA factors) moves, nothing stays behind
between calls, and a budget-forced streaming `generate` writes the same mp4 bytes as an unlimited one."""
from __future__ import annotations

import pytest
import torch

from _dit_testutil import random_inputs, random_model, small_config
from infinitetalk.errors import InputError
from infinitetalk.runtime import budget
from infinitetalk.runtime.streaming import BlockStreamer


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _quantise_and_add_lora(block: torch.nn.Module) -> None:
    """fp8 storage + per-tensor scale on the FFN input layer, an unmerged LoRA on self_attn.q."""
    lin = block.ffn[0]
    w = lin.weight.data.float()
    scale = w.abs().max() / 448.0
    lin.weight.data = (w / scale).to(torch.float8_e4m3fn)
    lin.weight_scale = scale.reshape(())
    q = block.self_attn.q
    g = torch.Generator().manual_seed(3)
    q.lora_down = torch.randn(4, q.in_features, generator=g) * 0.1
    q.lora_up = torch.randn(q.out_features, 4, generator=g) * 0.1


def test_streamed_equals_resident_and_moves_every_tensor():
    cfg = small_config(num_layers=4)
    model = random_model(cfg)
    for i in (1, 2):
        _quantise_and_add_lora(model.blocks[i])
    inputs = random_inputs(cfg, persons=2)
    with torch.no_grad():
        resident = model(**inputs)

        streamer = BlockStreamer(model.blocks, (1, 2, 3), "cpu").install()
        owned = {n: t for n, t in model.blocks[2].named_buffers()}
        assert owned["self_attn.q.lora_down"].numel() == 0 and owned["ffn.0.weight_scale"].numel() == 0
        assert all(p.numel() == 0 for p in model.blocks[1].parameters())
        assert all(p.numel() > 0 for p in model.blocks[0].parameters())
        streamed = model(**inputs)
        assert streamer.copies == 3                 # one copy per streamed block per call
        assert all(p.numel() == 0 for p in model.blocks[3].parameters())   # dropped after the call
        again = model(**inputs)
        assert streamer.copies == 6
        streamer.remove()
        restored = model(**inputs)

    assert _rel_l2(streamed, resident) <= 1e-6
    assert torch.equal(streamed, again) and torch.equal(restored, resident)
    assert model.blocks[2].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert model.blocks[2].self_attn.q.lora_down.shape == (4, cfg.dim)


def test_streaming_really_uses_the_host_copy():
    """Changing a streamed block's host copy changes the output: the call reads the copy, not a leftover."""
    cfg = small_config(num_layers=2)
    model = random_model(cfg)
    inputs = random_inputs(cfg)
    with torch.no_grad():
        streamer = BlockStreamer(model.blocks, (1,), "cpu").install()
        before = model(**inputs)
        for slot in streamer._slots[1]:
            if slot.name == "weight" and slot.host.dim() == 2:
                slot.host.mul_(1.5)
        after = model(**inputs)
    assert _rel_l2(after, before) > 1e-3


def test_bad_indices_are_refused():
    cfg = small_config(num_layers=2)
    with pytest.raises(ValueError, match="outside"):
        BlockStreamer(random_model(cfg).blocks, (2,), "cpu")


# ------------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def bundle(tiny_models):
    from infinitetalk.pipeline.models import load_models

    return load_models(tiny_models, preset="quality", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def turbo_bundle(tiny_models):
    """The 4-step distilled DiT (LightX2V fp8 layout would do too; bf16 is picked first), one call per step."""
    from infinitetalk.pipeline.models import load_models

    return load_models(tiny_models, preset="turbo", device="cpu", dtype="fp32")


def _media(tmp_path):
    from infinitetalk.audio.io import write_wav
    from infinitetalk.demo import synthetic_voice, two_faces_image, write_png

    rate = 22050
    return dict(image=write_png(tmp_path / "two.png", two_faces_image(128, 192)),
                left_audio=write_wav(tmp_path / "l.wav", synthetic_voice(0.5, 120.0, rate, seed=1)[None], rate),
                right_audio=write_wav(tmp_path / "r.wav", synthetic_voice(0.5, 200.0, rate, seed=2)[None], rate))


def _request(media, out, **kw):
    from infinitetalk.pipeline.request import GenerationRequest

    args = dict(seed=7, steps=1, size_scale=0.05, frame_num=21, motion_frames=5, **media)
    return GenerationRequest(out=out, **{**args, **kw})


def _forcing_budget(models, req_media, tmp_path) -> int:
    """A budget 1 byte below 'every block resident, one guidance call at a time' for this job."""
    from infinitetalk.pipeline.generate import _place_for_job
    from infinitetalk.pipeline.inputs import prepare_inputs

    req = _request(req_media, tmp_path / "probe.mp4").resolved()
    inputs = prepare_inputs(req)
    try:
        models.budget = 10 * budget.GiB
        _place_for_job(models, req, inputs)
        (w, _), others = models._sizes
        p = models.plan.placement
        act = budget.dit_activation_bytes(w, models.plan.job.tokens, 1, models.dtype.itemsize)
        vae = sum(others["vae"].values())
        return w.total_bytes + act + vae + budget.RUNTIME_RESERVE_BYTES - 1 if not p.streaming else -1
    finally:
        inputs.source.close()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["quality", "turbo"])
def test_generate_with_forced_streaming_writes_the_same_bytes(preset, request, tmp_path, monkeypatch):
    """The VAE decode is left out of the budget here (its own test below) so only the DiT placement changes."""
    from infinitetalk.pipeline.generate import generate

    bundle = request.getfixturevalue("turbo_bundle" if preset == "turbo" else "bundle")
    monkeypatch.setattr(budget, "VAE_DECODE_LIVE_TENSORS", 0)
    media = _media(tmp_path)
    tight = _forcing_budget(bundle, media, tmp_path)
    assert tight > 0

    bundle.budget = None
    plain = generate(_request(media, tmp_path / "plain.mp4", preset=preset), bundle)
    assert not bundle.placement.streaming and bundle._streamer is None

    bundle.budget = tight
    streamed = generate(_request(media, tmp_path / "streamed.mp4", preset=preset), bundle)
    assert bundle.placement.streaming and bundle.plan.fits
    assert bundle.placement.max_guidance_batch == 1
    assert bundle._streamer is not None and bundle._streamer.copies > 0
    assert plain.path.read_bytes() == streamed.path.read_bytes()


def test_generate_refuses_a_job_that_cannot_fit(bundle, tmp_path):
    from infinitetalk.pipeline.generate import generate

    media = _media(tmp_path)
    out = tmp_path / "refused.mp4"
    bundle.budget = 2**20
    try:
        with pytest.raises(InputError) as err:
            generate(_request(media, out), bundle)
    finally:
        bundle.budget = None
    assert err.value.input_name == "vram"
    assert "fits: NO" in str(err.value) and "peak DiT step" in str(err.value)
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_vae_tiles_when_a_whole_frame_does_not_fit(bundle):
    """A budget between 'DiT step fits' and 'whole-frame decode fits' makes the VAE decode in tiles
    (generate hands `bundle.vae_tile` to `decode_stream`; tiled decoding itself is tested in test_vae.py)."""
    from infinitetalk.runtime.budget import JobShape

    job = JobShape.for_window(160, 160, 21, 3)          # 20x20 latent px
    bundle.budget = None
    bundle.prepare(job)
    assert bundle._streamer is None and bundle.vae_tile is None
    (w, _), others = bundle._sizes
    held = w.total_bytes + sum(others["vae"].values()) + budget.RUNTIME_RESERVE_BYTES
    decode = budget.vae_decode_bytes(160, 160, bundle.vae.config.dim)
    act = budget.dit_activation_bytes(w, job.tokens, 3, bundle.dtype.itemsize)
    assert act < decode
    bundle.budget = held + act + (decode - act) // 2
    try:
        plan = bundle.prepare(job)
    finally:
        bundle.budget = None
    tile = plan.placement.vae_tile
    assert plan.fits and not plan.placement.streaming and plan.placement.max_guidance_batch == 3
    assert tile is not None and tile[0] < 20 and 0 < tile[2] < tile[0]
    assert plan.placement.vae_peak <= plan.placement.budget
    assert "tiles" in plan.text()
