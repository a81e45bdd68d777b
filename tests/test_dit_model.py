"""InfiniteTalk DiT math: shapes, invariants of the audio branch and L-RoPE, bf16 agreement."""
from __future__ import annotations

import pytest
import torch

from _dit_testutil import random_inputs, random_model, run, small_config
from conftest import golden_cases
from infinitetalk.errors import InputError
from infinitetalk.models import dit_blocks
from infinitetalk.models.audio_adapter import latent_audio_windows, speaker_positions
from infinitetalk.models.rope import apply_video_rope, rope_axis_split, timestep_sinusoid, video_rope_tables


@pytest.mark.parametrize("overrides, persons, frames, h, w", [
    (dict(), 1, 3, 8, 8),
    (dict(dim=96, num_heads=3, num_layers=1), 2, 2, 6, 10),   # odd head count, non-square latent
    (dict(dim=64, num_heads=8), 2, 1, 4, 6),                   # one latent frame, head_dim 8
])
def test_output_shape_and_finite(overrides, persons, frames, h, w):
    cfg = small_config(**overrides)
    out = run(random_model(cfg), random_inputs(cfg, persons, frames, h, w))
    assert out.shape == (cfg.out_dim, frames, h, w) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().mean() > 0


def test_one_speaker_ignores_masks_and_never_builds_the_map(monkeypatch):
    cfg = small_config()
    model, inputs = random_model(cfg), random_inputs(cfg, persons=1)
    calls = []
    real = dit_blocks.reference_attention_map
    monkeypatch.setattr(dit_blocks, "reference_attention_map", lambda *a: calls.append(1) or real(*a))
    out = run(model, inputs)
    assert calls == []
    other = dict(inputs, ref_target_masks=torch.rand(3, 8, 8).round())
    assert torch.equal(run(model, other), out)
    assert torch.equal(run(model, dict(inputs, ref_target_masks=None)), out)
    run(model, random_inputs(cfg, persons=2))
    assert len(calls) == cfg.num_layers  # two speakers: once per block


def test_two_speakers_depend_on_masks():
    cfg = small_config()
    model, inputs = random_model(cfg), random_inputs(cfg, persons=2)
    swapped = dict(inputs, ref_target_masks=inputs["ref_target_masks"][[1, 0, 2]])
    assert not torch.allclose(run(model, inputs), run(model, swapped))


def test_audio_attention_is_per_latent_frame():
    """With one block, changing the audio that only latent frame 2 sees changes only frame 2's output."""
    cfg = small_config(num_layers=1)
    model = random_model(cfg)
    for persons in (1, 2):
        inputs = random_inputs(cfg, persons=persons, frames=4)
        changed = inputs["audio"].clone()
        changed[:, 5:9] += torch.randn_like(changed[:, 5:9])  # video frames 5..8 = latent frame 2
        a, b = run(model, inputs), run(model, dict(inputs, audio=changed))
        diff = (a - b).abs().amax(dim=(0, 2, 3))
        assert diff[2] > 1e-3
        assert torch.equal(diff[[0, 1, 3]], torch.zeros(3))


def test_latent_audio_windows_select_reference_entries():
    audio = torch.arange(9 * 5, dtype=torch.float32).view(1, 9, 5, 1, 1)  # value = 5·frame + entry
    first, later = latent_audio_windows(audio, vae_scale=4, audio_window=5)
    assert first.flatten().tolist() == [0, 1, 2, 3, 4]
    # latent 1 covers video frames 1..4: entries 0..2 of f1, centre of f2 and f3, entries 2..4 of f4
    assert later[0, 0].flatten().tolist() == [5, 6, 7, 12, 17, 22, 23, 24]
    assert later.shape == (1, 2, 8, 1, 1)


def test_speaker_positions_ranges_and_swap():
    g = torch.Generator().manual_seed(0)
    attn_map = torch.rand(3, 50, generator=g)
    pos = speaker_positions(attn_map)
    cls = attn_map.argmax(0)
    assert ((pos[cls == 0] >= 0) & (pos[cls == 0] <= 4)).all()
    assert ((pos[cls == 1] >= 20) & (pos[cls == 1] <= 24)).all()
    assert (pos[cls == 2] == 12).all()
    assert pos[cls == 0].max() == pytest.approx(4, abs=1e-6) or (cls == 0).sum() == 0
    swapped = speaker_positions(attn_map[[1, 0, 2]])
    shift = torch.where(cls == 0, 20.0, torch.where(cls == 1, -20.0, 0.0))
    torch.testing.assert_close(swapped, pos + shift, atol=1e-5, rtol=0)


def test_reference_map_matches_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 4, 30, 8, generator=g)
    masks = (torch.rand(3, 10, generator=g) > 0.5).float()
    got = dit_blocks.reference_attention_map(q, k, masks, "sdpa")
    attn = (q @ k[:, :, :10].transpose(-1, -2) / 8 ** 0.5).softmax(-1)  # [1, 4, 30, 10]
    per_head = attn[0] @ masks.t() / masks.sum(1)                      # [4, 30, 3]
    torch.testing.assert_close(got, per_head.mean(0).t(), atol=1e-6, rtol=1e-5)


def test_rope_helpers():
    assert rope_axis_split(128) == (22, 21, 21) and rope_axis_split(32) == (6, 5, 5)
    rotations = video_rope_tables((2, 3, 4), 32)
    assert rotations.shape == (24, 1, 16, 2) and rotations.dtype == torch.float64
    x = torch.randn(24, 2, 32)
    y = apply_video_rope(x, rotations)
    as_complex = torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * torch.view_as_complex(rotations)
    torch.testing.assert_close(y, torch.view_as_real(as_complex).flatten(-2).float())  # the reference's complex maths
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[0], x[0], atol=0, rtol=0)  # token (0,0,0) has angle 0
    emb = timestep_sinusoid(256, torch.tensor([999.0]))
    assert emb.dtype == torch.float64 and emb.shape == (1, 256)


def test_math_backend_matches_sdpa():
    cfg = small_config()
    inputs = random_inputs(cfg, persons=2)
    a = run(random_model(cfg, attention="sdpa"), inputs)
    b = run(random_model(cfg, attention="math"), inputs)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named():
    cfg = small_config()
    model, inputs = random_model(cfg), random_inputs(cfg, persons=2)
    with pytest.raises(InputError, match="audio"):
        run(model, dict(inputs, audio=inputs["audio"][:, :-1]))
    with pytest.raises(InputError, match="ref_target_masks"):
        run(model, dict(inputs, ref_target_masks=None))
    with pytest.raises(InputError, match="context"):
        run(model, dict(inputs, context=torch.randn(cfg.text_len + 1, cfg.text_dim)))


@pytest.mark.parametrize("case_dir", golden_cases("dit"), ids=lambda p: p.name)
def test_bf16_close_to_fp32_on_golden(case_dir):
    from infinitetalk.loaders.dit import load_dit
    from infinitetalk.parity.runner import Case

    case = Case.load(case_dir)
    i = case.inputs()
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = load_dit(case.weights_path, dtype=dtype, num_heads=case.config["num_heads"])
        assert model.patch_embedding.weight.dtype == dtype
        with torch.inference_mode():
            outs.append(model(i["x"], i["t"], i["context"], i["clip_fea"], i["y"], i["audio"], i["ref_target_masks"]))
    cos = torch.nn.functional.cosine_similarity(outs[0].flatten().double(), outs[1].flatten().double(), dim=0)
    assert cos >= 0.999


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("persons", [1, 2])
def test_forward_batch_equals_separate_calls(persons):
    """Guidance branches batched: different prompts and a one-person silent branch next to two speakers."""
    cfg = small_config(dim=96, num_heads=3, num_layers=2)
    model, inputs = random_model(cfg), random_inputs(cfg, persons=persons, frames=2, h=6, w=10)
    other_ctx = torch.randn(9, cfg.text_dim, generator=torch.Generator().manual_seed(5))
    silent = torch.zeros_like(inputs["audio"][-1:])
    contexts, audios = [inputs["context"], other_ctx, other_ctx], [inputs["audio"], inputs["audio"], silent]
    with torch.inference_mode():
        batched = model.forward_batch(inputs["x"], inputs["t"], contexts, inputs["clip_fea"], inputs["y"], audios,
                                      inputs["ref_target_masks"])
    assert batched.shape == (3, cfg.out_dim, 2, 6, 10)
    for i, (context, audio) in enumerate(zip(contexts, audios)):
        single = run(model, dict(inputs, context=context, audio=audio))
        assert _rel_l2(batched[i], single) <= 1e-6
    assert _rel_l2(batched[0], batched[1]) > 1e-3  # the branches really differ


def test_audio_attention_range_equals_per_frame_attention():
    """A token range that cuts latent frames (a sequence-parallel shard) gets the per-frame result."""
    cfg = small_config()
    block = random_model(cfg).blocks[0].audio_cross_attn
    g = torch.Generator().manual_seed(0)
    n_t, s = 3, 10
    x = torch.randn(n_t, s, cfg.dim, generator=g)
    tokens = torch.randn(n_t, 2 * cfg.context_tokens, cfg.output_dim, generator=g)
    positions = torch.rand(n_t * s, generator=g) * 24
    for pos in (None, positions):
        full = block(x, tokens, pos).reshape(n_t * s, cfg.dim)
        for start, stop in ((0, 7), (7, 23), (23, 30)):
            got = block.forward_range(x.reshape(-1, cfg.dim)[start:stop], tokens,
                                      None if pos is None else pos[start:stop], start, n_t * s)
            torch.testing.assert_close(got, full[start:stop], atol=1e-6, rtol=1e-5)
