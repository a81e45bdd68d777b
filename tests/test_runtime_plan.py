"""The memory plan: budget arithmetic, header-only sizing of the real 14B layouts (sparse files), the
`plan` command, and agreement between header sizes and loaded modules."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from infinitetalk.runtime import budget
from infinitetalk.runtime.budget import GiB, DiTWeights, JobShape, decide_placement, spread_indices


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory):
    from infinitetalk.tiny.sparse import write_real_layouts

    root = tmp_path_factory.mktemp("real14b")
    write_real_layouts(root)
    return root


@pytest.fixture
def header_only(monkeypatch):
    """Reading any tensor's data fails: a plan must come from headers alone."""
    from infinitetalk.checkpoints import reader

    def refuse(*_a, **_k):
        raise AssertionError("tensor data was read")
    monkeypatch.setattr(reader, "_read_into", refuse)


def test_spread_indices_are_even_and_exact():
    assert spread_indices(0, 40) == ()
    assert spread_indices(40, 40) == tuple(range(40))
    picked = spread_indices(10, 40)
    assert len(picked) == 10 and all(b - a == 4 for a, b in zip(picked, picked[1:]))


def test_more_budget_never_streams_more():
    w = DiTWeights(dim=512, ffn_dim=1024, text_len=512, block_bytes=(10 * 2**20,) * 20, other_bytes=2**20)
    job = JobShape.for_window(640, 640, 81, 3)
    streamed = [len(decide_placement(w, job, b * 2**20, act_bytes=2, vae_channels=8).streamed)
                for b in range(1150, 1460, 10)]
    assert streamed == sorted(streamed, reverse=True) and streamed[0] > 0 and streamed[-1] == 0
    roomy = decide_placement(w, job, 64 * GiB, act_bytes=2, vae_channels=8)
    assert roomy.max_guidance_batch == 3 and not roomy.streaming and roomy.vae_tile is None
    solo = decide_placement(w, job, 64 * GiB, act_bytes=2, vae_channels=8, batch_guidance=False)
    assert solo.max_guidance_batch == 1
    hopeless = decide_placement(w, job, 2**20, act_bytes=2, vae_channels=8)
    assert not hopeless.fits and len(hopeless.streamed) == 20 and "DiT step" in hopeless.reasons[0]


def test_14b_fast_480p_fits_12gb_streaming_and_40gb_resident(real_layouts, header_only):
    from infinitetalk.pipeline.models import plan_from_files

    small = plan_from_files(real_layouts, preset="fast", resolution="480p", vram_gb=12)
    assert small.fits, small.text()
    p = small.placement
    assert p.streaming and 0 < p.resident_blocks < 40 and p.max_guidance_batch == 1
    assert p.dit_peak <= 12 * GiB and p.vae_peak <= 12 * GiB
    assert small.job.tokens >= 33_600 and small.job.latent_frames == 21 and small.job.calls_per_step == 2

    sizes = {c.name: c for c in small.components}
    dit = sizes["dit"].bytes_by_dtype
    assert 15.0 * GiB < dit["float8_e4m3fn"] < 15.6 * GiB          # the 16.4 GB Comfy-Org fp8 file's weights
    assert 5.0 * GiB < dit["bfloat16"] < 6.5 * GiB                  # patch (fp16 -> bf16) + rank-64 LoRA + the rest
    assert sizes["wav2vec2"].where == "cpu" and sizes["text_encoder"].where == "visits"

    big = plan_from_files(real_layouts, preset="fast", resolution="480p", vram_gb=40)
    assert big.fits and not big.placement.streaming and big.placement.vae_tile is None
    assert big.placement.max_guidance_batch == 2

    tiny = plan_from_files(real_layouts, preset="fast", resolution="480p", vram_gb=4)
    assert not tiny.fits and "fits: NO" in tiny.text()
    assert 4 * GiB < tiny.smallest_budget <= 12 * GiB


def test_720p_quality_needs_more_than_480p_fast(real_layouts, header_only):
    from infinitetalk.pipeline.models import plan_from_files

    fast = plan_from_files(real_layouts, preset="fast", resolution="480p", vram_gb=24)
    quality = plan_from_files(real_layouts, preset="quality", resolution="720p", vram_gb=24,
                              overrides={"loras": []})
    assert quality.job.tokens > 2 * fast.job.tokens and quality.job.calls_per_step == 3
    assert len(quality.placement.streamed) > len(fast.placement.streamed)


def test_plan_command_text_json_and_exit_status(real_layouts, header_only, capsys):
    from infinitetalk.cli import main

    assert main(["plan", "--models", str(real_layouts), "--preset", "fast", "--vram", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["dit"]["streamed_blocks"] and out["budget_bytes"] == 12 * GiB
    assert {c["name"] for c in out["components"]} == {"dit", "vae", "text_encoder", "clip_vision", "wav2vec2"}

    assert main(["plan", "--models", str(real_layouts), "--preset", "fast", "--vram", "3"]) == 1
    text = capsys.readouterr().out
    assert "fits: NO" in text and "peak DiT step" in text and "smallest budget that fits" in text

    assert main(["plan", "--models", str(real_layouts), "--vram", "-1"]) == 2
    assert "vram" in capsys.readouterr().err


def test_header_sizes_match_the_loaded_module(tiny_models):
    """The sizing rules (fp8 stays fp8, scales -> float32, the rest -> run dtype) agree with what loads."""
    from infinitetalk.loaders import load_dit
    from infinitetalk.pipeline.model_files import resolve_model_paths
    from infinitetalk.runtime.plan import _dit_from_files, dit_weights_of

    fp8 = {"dit": next(tiny_models.rglob("*fp8_e4m3fn_scaled_KJ.safetensors"))}
    lora = next(tiny_models.rglob("*lightx2v*.safetensors"))
    for overrides, loras in (({}, []), ({}, [lora]), (fp8, []), (fp8, [lora])):
        paths = resolve_model_paths(tiny_models, "quality", overrides)
        for dtype in (torch.float32, torch.bfloat16):
            from_headers, dtypes = _dit_from_files(paths.dit, paths.patch, loras, dtype)
            model = load_dit(paths.dit, paths.patch, loras=[(p, 1.0) for p in loras], dtype=dtype)
            loaded, loaded_dtypes = dit_weights_of(model)
            case = (paths.dit.name, [p.name for p in loras], dtype)
            assert from_headers.block_bytes == loaded.block_bytes, case
            assert from_headers.other_bytes == loaded.other_bytes and dtypes == loaded_dtypes, case
            if loras and overrides:   # fp8 base: the LoRA stays a low-rank path (more bytes than without)
                assert any(n.endswith("lora_down") for n, _ in model.named_buffers())


def test_generate_flags_build_one_runtime_options():
    from infinitetalk.cli import _runtime_from_args, build_parser
    from infinitetalk.errors import InputError

    base = ["generate", "--image", "a.png", "--left-audio", "l.wav", "--right-audio", "r.wav", "--out", "o.mp4"]
    args = build_parser().parse_args(base + ["--vram", "12", "--attention", "math", "--fp8-matmul", "off",
                                             "--compile", "--no-batch-guidance"])
    opts = _runtime_from_args(args)
    assert (opts.vram_gb, opts.attention, opts.fp8_matmul, opts.compile, opts.batch_guidance) == \
        (12.0, "math", "off", True, False)
    assert opts.budget_bytes == 12 * GiB
    defaults = _runtime_from_args(build_parser().parse_args(base))
    assert defaults.vram_gb is None and defaults.batch_guidance and defaults.budget_bytes is None
    with pytest.raises(InputError, match="vram"):
        _runtime_from_args(build_parser().parse_args(base + ["--vram", "-2"]))
    tuned = _runtime_from_args(build_parser().parse_args(base + ["--fp8-matmul", "on", "--fp8-fast-accum",
                                                                 "--fuse", "off"]))
    assert (tuned.fp8_matmul, tuned.fp8_fast_accum, tuned.fuse) == ("on", True, "off")
    assert (defaults.fp8_fast_accum, defaults.fuse) == (False, "auto")


def test_plan_command_plans_the_fp8_matmul_it_is_told(monkeypatch, tmp_path):
    """`plan --fp8-matmul on` reaches the header plan (its e4m3 workspace instead of a dequantised weight)."""
    import infinitetalk.pipeline.models as models
    from infinitetalk.cli import main

    seen = []

    def fake_plan(*args, **kwargs):
        seen.append(kwargs["fp8_matmul"])
        raise InputError("models", "stop here")

    from infinitetalk.errors import InputError
    monkeypatch.setattr(models, "plan_from_files", fake_plan)
    for flag, want in (([], False), (["--fp8-matmul", "on"], True), (["--fp8-matmul", "auto"], True)):
        assert main(["plan", "--models", str(tmp_path), *flag]) == 2
        assert seen[-1] is want, flag


# ------------------------------------------------------------------------------------- VAE tiles
@pytest.mark.parametrize("size", [(480, 832), (832, 480), (640, 640), (720, 1280), (1088, 384)])
def test_vae_tiles_decode_at_most_1_3x_the_frame_at_every_budget(size):
    """From 'whole frame fits' down to 'nothing fits': the tiles chosen never decode more than 1.3x the frame
    (counted with the VAE's own tiling, models/vae.py `_spans`), and more room never means more tiles."""
    from infinitetalk.models.vae import _spans

    job = JobShape.for_window(*size, 81, 2)
    lh, lw = size[0] // 8, size[1] // 8
    full = budget.vae_decode_bytes(*size, 96)
    counts = []
    for room in [int(full * f / 200) for f in range(1, 200)]:
        tile, cost = budget._vae_tile(job, room, 96)
        if tile is None:
            assert cost > room
            continue
        th, tw, ov = tile
        assert cost <= room and 0 <= ov < min(th, tw) and th <= lh and tw <= lw
        ys, xs = _spans(lh, th, ov), _spans(lw, tw, ov)
        decoded = sum(e - s for s, e in ys) * sum(e - s for s, e in xs)
        assert decoded <= 1.3 * lh * lw, (room, tile)
        assert budget.vae_tile_work(lh, lw, tile) == pytest.approx(decoded / (lh * lw))
        counts.append(len(ys) * len(xs))
    assert counts and counts == sorted(counts, reverse=True) and counts[-1] == 2


def test_tile_spans_counts_like_the_vae():
    from infinitetalk.models.vae import _spans

    for size in range(1, 70):
        for tile in range(1, size + 3):
            for ov in range(0, min(tile, 9)):
                assert budget.tile_spans(size, tile, ov) == len(_spans(size, tile, ov)), (size, tile, ov)


def test_placement_tiles_keep_overlap_where_the_budget_allows():
    """A budget that fits about half a 480p frame decodes two tiles with the full overlap, not 1.5-3.9x the frame."""
    w = DiTWeights(dim=512, ffn_dim=1024, text_len=512, block_bytes=(10 * 2**20,) * 4, other_bytes=2**20)
    job = JobShape.for_window(480, 832, 81, 1)
    full = budget.vae_decode_bytes(480, 832, 96)
    roomy = decide_placement(w, job, None, act_bytes=2)
    held = roomy.vae_peak - full
    p = decide_placement(w, job, held + int(full * 0.6), act_bytes=2)
    assert p.fits and p.vae_tile is not None and p.vae_tile[2] == budget.VAE_TILE_OVERLAP
    assert budget.vae_tile_work(60, 104, p.vae_tile) <= 1.3 and p.vae_peak <= p.budget


# ------------------------------------------------------------------------------------- what the plan holds
_14B = DiTWeights(dim=5120, ffn_dim=13824, text_len=512, block_bytes=(5120 * 5120 * 2 * 14,) * 40,
                  other_bytes=2 * GiB)


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_gguf_dit_is_sized_packed_from_its_header_and_counts_its_dequant(tmp_path, mix):
    """Header sizes of a GGUF DiT equal the loaded module's (Linear weights stay packed), and the plan adds
    the float32 temporaries of dequantising its largest Linear weight."""
    from _dit_testutil import random_state, small_config
    from infinitetalk.loaders.dit import load_dit
    from infinitetalk.runtime.plan import _dit_from_files, dit_weights_of
    from infinitetalk.tiny.gguf import save_gguf

    cfg = small_config(num_layers=2)
    path = save_gguf(random_state(cfg, seed=4), tmp_path / f"tiny_{mix}.gguf", mix)
    model = load_dit(path, dtype=torch.float32, num_heads=cfg.num_heads, config={"audio_layers": cfg.audio_layers})
    loaded, loaded_dtypes = dit_weights_of(model)
    headers, header_dtypes = _dit_from_files(path, None, [], torch.float32)
    assert headers == loaded and header_dtypes == loaded_dtypes and "uint8" in loaded_dtypes
    assert loaded.largest_gguf_linear >= cfg.dim * cfg.ffn_dim and loaded.largest_fp8_linear == 0

    full = budget.dit_activation_bytes(dataclasses.replace(_14B, largest_gguf_linear=5120 * 13824), 33_600, 1, 2)
    assert 0.9 * GiB < full - budget.dit_activation_bytes(_14B, 33_600, 1, 2) < 1.3 * GiB   # ≈ 1 GB


def test_teacache_residuals_are_in_the_plan():
    job = JobShape.for_window(640, 640, 81, 3)
    cached = JobShape.for_window(640, 640, 81, 3, teacache=True)
    held = budget.teacache_bytes(_14B, cached, 2)
    assert budget.teacache_bytes(_14B, job, 2) == 0 and 0.9 * GiB < held < 1.1 * GiB     # ≈ 1 GiB at 480p
    plain, skip = (decide_placement(_14B, j, None, act_bytes=2, batch_guidance=False) for j in (job, cached))
    assert skip.dit_peak - plain.dit_peak == held and skip.vae_peak - plain.vae_peak == held
    tight = plain.dit_peak + 10 * 2**20    # fits without the residuals: with them blocks must stream
    assert not decide_placement(_14B, job, tight, act_bytes=2, batch_guidance=False).streaming
    assert decide_placement(_14B, cached, tight, act_bytes=2, batch_guidance=False).streaming


@pytest.mark.parametrize("world, calls, want_calls, want_split", [(2, 2, 1, 1), (4, 2, 1, 2), (2, 3, 3, 2),
                                                                   (3, 3, 1, 1), (1, 3, 3, 1)])
def test_each_rank_plans_for_its_share(world, calls, want_calls, want_split):
    from infinitetalk.runtime.plan import job_on_rank

    whole = JobShape.for_window(640, 640, 81, calls)
    share = job_on_rank(whole, world, num_heads=40)
    assert (share.calls_per_step, share.sequence_ranks) == (want_calls, want_split)
    assert share.local_tokens == -(-whole.tokens // want_split)
    a, b = (decide_placement(_14B, j, None, act_bytes=2) for j in (whole, share))
    assert b.dit_peak <= a.dit_peak and (b.dit_peak < a.dit_peak) == (share != whole)


def test_fp8_matmul_plans_its_e4m3_workspace_not_a_dequantised_weight(tiny_models):
    """With `_scaled_mm` on, no fp8 weight is dequantised: the plan counts the e4m3 copy of the largest
    call's input (the FFN hidden) instead."""
    from infinitetalk.loaders import load_dit
    from infinitetalk.models.layers import Linear, fp8_matmul_workspace_bytes
    from infinitetalk.pipeline.model_files import resolve_model_paths
    from infinitetalk.runtime.plan import dit_weights_of

    tokens, fp8 = 33_600, dataclasses.replace(_14B, largest_fp8_linear=5120 * 13824)
    dequantised = budget.dit_activation_bytes(fp8, tokens, 1, 2)
    e4m3 = budget.dit_activation_bytes(dataclasses.replace(_14B, fp8_matmul=True), tokens, 1, 2)
    base = budget.dit_activation_bytes(_14B, tokens, 1, 2)
    assert e4m3 - base == pytest.approx(fp8_matmul_workspace_bytes(tokens, 13824) * budget.ACTIVATION_SAFETY, abs=2)
    assert dequantised - base == pytest.approx(2 * 5120 * 13824 * 2 * budget.ACTIVATION_SAFETY, abs=2)

    path = next(tiny_models.rglob("*fp8_e4m3fn_scaled_KJ.safetensors"))
    model = load_dit(path, resolve_model_paths(tiny_models, "quality", {"dit": path}).patch, dtype=torch.bfloat16)
    before = dit_weights_of(model)[0]
    assert before.largest_fp8_linear > 0 and not before.fp8_matmul
    for m in model.modules():
        if isinstance(m, Linear):
            m.fp8_matmul = m.weight.dtype == torch.float8_e4m3fn   # what runtime/kernels.py sets on a GPU
    after = dit_weights_of(model)[0]
    assert after.fp8_matmul and after.largest_fp8_linear == 0 and after.block_bytes == before.block_bytes


def test_fp8_matmul_header_plan_of_the_14b_swaps_the_weight_copy_for_the_workspace(real_layouts, header_only):
    from infinitetalk.models.layers import fp8_matmul_workspace_bytes
    from infinitetalk.pipeline.models import plan_from_files

    plain, fast = (plan_from_files(real_layouts, preset="fast", resolution="480p", fp8_matmul=on) for on in (False, True))
    dit_plain, dit_fast = plain.placement.dit_peak, fast.placement.dit_peak
    ffn_rows = plain.job.tokens * plain.job.calls_per_step   # unlimited budget: every guidance call batched
    assert dit_fast - dit_plain == pytest.approx(
        (fp8_matmul_workspace_bytes(ffn_rows, 13824) - 2 * 5120 * 13824 * 2) * budget.ACTIVATION_SAFETY, rel=1e-6)
