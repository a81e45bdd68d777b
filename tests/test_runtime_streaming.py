"""Block streaming on the CPU (the same code path as CUDA without streams): streamed and resident DiT give
the same output, every tensor a block owns (fp8 weight + scale, LoRA factors) moves, nothing stays behind
between calls, memory is a fixed ring of device buffers and one host arena per block, and a budget-forced
streaming `generate` writes the same mp4 bytes as an unlimited one."""
from __future__ import annotations

import contextlib

import pytest
import torch

from _dit_testutil import random_inputs, random_model, small_config
from infinitetalk.errors import InputError
from infinitetalk.runtime import budget
from infinitetalk.runtime.streaming import ARENA_ALIGN, BlockStreamer, arena_layout


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
        assert streamer.copies == 4                 # one copy per streamed block, + block 1 prefetched for the next call
        assert all(p.numel() == 0 for p in model.blocks[3].parameters())   # dropped after the call
        again = model(**inputs)
        assert streamer.copies == 7
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


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_device_memory_is_a_fixed_ring_over_many_calls(prefetch):
    """prefetch + 1 buffers allocated once; every streamed block runs from one of them; output unchanged."""
    cfg = small_config(num_layers=5)
    model = random_model(cfg)
    inputs = random_inputs(cfg, persons=2)
    seen: list[tuple[int, int]] = []

    def where(module, args):   # runs after the streamer's pre-hook: the block's tensors are attached
        seen.append(min((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in module.parameters()))

    with torch.no_grad():
        resident = model(**inputs)
        streamer = BlockStreamer(model.blocks, (0, 2, 3, 4), "cpu", prefetch=prefetch).install()
        for i in (0, 2, 3, 4):
            model.blocks[i].register_forward_pre_hook(where)
        ring = [b.data_ptr() for b in streamer._ring]
        outputs = [model(**inputs) for _ in range(6)]
    assert len(ring) == prefetch + 1 and streamer.allocations == 1
    assert [b.data_ptr() for b in streamer._ring] == ring
    lo, hi = streamer._ring[0].data_ptr(), streamer._ring[-1].data_ptr() + streamer._ring[-1].numel()
    assert len(seen) == 6 * 4 and all(lo <= a and b <= hi for a, b in seen)
    assert streamer.copies == 6 * 4 + min(prefetch, 3)   # each block once per call, + the next call's first
    assert all(torch.equal(o, resident) for o in outputs)


def test_blocks_called_out_of_order_still_get_their_own_weights():
    """A ring buffer is reused by whichever block needs it; a block evicted before it ran is copied again."""
    cfg = small_config(num_layers=4)
    model = random_model(cfg)
    calls: dict[int, tuple] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.setdefault(i, a)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(**random_inputs(cfg, persons=2))          # records each block's real arguments
        for h in hooks:
            h.remove()
        want = {i: model.blocks[i](*calls[i]) for i in range(4)}
        streamer = BlockStreamer(model.blocks, range(4), "cpu", prefetch=1).install()
        for i in (2, 0, 3, 3, 1, 2, 0):
            assert torch.equal(model.blocks[i](*calls[i]), want[i]), i
    assert streamer.allocations == 1 and len(streamer._ring) == 2


def test_host_copies_are_one_aligned_arena_per_block():
    cfg = small_config(num_layers=3)
    model = random_model(cfg)
    streamer = BlockStreamer(model.blocks, (0, 2), "cpu").install()
    for i in (0, 2):
        arena, _ = streamer._arenas[i]
        lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
        for slot in streamer._slots[i]:
            assert slot.host.data_ptr() % ARENA_ALIGN == lo % ARENA_ALIGN and lo <= slot.host.data_ptr() < hi
    assert streamer.host_bytes == sum(s.host.numel() * s.host.element_size() for i in (0, 2)
                                      for s in streamer._slots[i])
    assert streamer.host_bytes <= streamer.arena_bytes < streamer.host_bytes + 2 * 64 * ARENA_ALIGN


def test_full_size_block_arena_costs_at_most_5_percent_over_its_tensors():
    """The pinned bytes of a real 14B block (bf16, and fp8 weights with float32 scales) over its tensor bytes."""
    from infinitetalk.checkpoints import build_on_meta
    from infinitetalk.models.dit import DiTConfig, InfiniteTalkDiT

    model = build_on_meta(lambda: InfiniteTalkDiT(DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=1)))
    tensors = list(model.blocks[0].parameters()) + list(model.blocks[0].buffers())
    for fp8 in (False, True):
        sizes = [t.numel() * (1 if fp8 and t.dim() == 2 else 2) for t in tensors]
        sizes += [4] * sum(t.dim() == 2 for t in tensors) if fp8 else []
        layout = arena_layout(sizes)
        assert layout.payload > 300 * 2**20 if not fp8 else layout.payload > 150 * 2**20
        assert layout.total <= 1.05 * layout.payload
        assert all(o % ARENA_ALIGN == 0 for o in layout.offsets)
        ends = [o + n for o, n in zip(layout.offsets, layout.nbytes)]
        assert all(e <= o for e, o in zip(ends, layout.offsets[1:])) and ends[-1] <= layout.total


def test_streaming_never_recompiles_a_compiled_block():
    """Installed and run under inference_mode (as jobs run), streamed blocks hold ordinary tensors like the
    resident ones: a compiled block keeps its one graph over many calls and buffers."""
    import torch._dynamo

    from infinitetalk.runtime.kernels import compile_blocks

    cfg = small_config(num_layers=4)
    model = random_model(cfg)
    inputs = random_inputs(cfg, persons=2)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            want = model(**inputs)
            compile_blocks(model.blocks, counting)
            model(**inputs)
            BlockStreamer(model.blocks, range(4), "cpu", prefetch=2).install()
            outputs = [model(**inputs) for _ in range(5)]
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert all(torch.allclose(o, want, rtol=1e-5, atol=1e-6) for o in outputs)


def test_cuda_path_orders_every_buffer_reuse_after_its_last_reader(monkeypatch):
    """The CUDA code path with recording stand-ins for streams, events and cudart (tensors stay on the CPU):
    every arena is registered and unregistered, the compute stream waits for each copy, and a buffer is
    only refilled after the event recorded when its previous block finished."""
    log: list[tuple[str, object, object]] = []

    class Event:
        def record(self, stream=None):
            log.append(("record", stream, self))

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_event(self, event):
            log.append(("wait", self, event))

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    class Cudart:
        registered: set[int] = set()

        def cudaHostRegister(self, ptr, size, flags):
            self.registered.add(ptr)
            return 0

        def cudaHostUnregister(self, ptr):
            self.registered.remove(ptr)
            return 0

    compute, cudart = Stream(), Cudart()
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)

    cfg = small_config(num_layers=5)
    model = random_model(cfg)
    inputs = random_inputs(cfg, persons=2)
    with torch.no_grad():
        resident = model(**inputs)
        streamer = BlockStreamer(model.blocks, (0, 1, 3, 4), "cpu", prefetch=2)
        streamer.cuda, streamer._side = True, Stream()
        streamer.install()
        assert len(cudart.registered) == 4
        outputs = [model(**inputs) for _ in range(3)]
        free, ready, side = list(streamer._free), list(streamer._ready), streamer._side
        streamer.remove("cpu")
    assert all(torch.equal(o, resident) for o in outputs) and not cudart.registered
    assert sum(1 for op, s, e in log if op == "wait" and s is compute and e in ready) == 3 * 4
    for k, done in enumerate(free):
        order = [op for op, s, e in log if e is done and (op == "record" and s is compute or s is side)]
        assert order.count("wait") == sum(1 for op, s, e in log if op == "record" and s is side and e is ready[k])
        waits = [i for i, op in enumerate(order) if op == "wait"]
        assert len(waits) >= 4 and all("record" in order[a + 1:b] for a, b in zip(waits, waits[1:]))


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
    assert not bundle.placement.streaming and bundle.streamer is None

    bundle.budget = tight
    streamed = generate(_request(media, tmp_path / "streamed.mp4", preset=preset), bundle)
    assert bundle.placement.streaming and bundle.plan.fits
    assert bundle.placement.max_guidance_batch == 1
    assert bundle.streamer is not None and bundle.streamer.copies > 0
    assert plain.path.read_bytes() == streamed.path.read_bytes()

    # core's memory manager takes the device (nodes/core_memory.py): everything goes to the host, streaming
    # included, and the next job places the DiT anew with the same result
    bundle.release_device()
    assert bundle.streamer is None and bundle.placement is None
    again = generate(_request(media, tmp_path / "again.mp4", preset=preset), bundle)
    assert bundle.streamer is not None and again.path.read_bytes() == plain.path.read_bytes()


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
    assert bundle.streamer is None and bundle.vae_tile is None
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
    assert tile is not None and tile[0] * tile[1] < 20 * 20 and 0 < tile[2] < min(tile[:2])
    assert budget.vae_tile_work(20, 20, tile) <= budget.VAE_MAX_WORK
    assert plan.placement.vae_peak <= plan.placement.budget
    assert "tiles" in plan.text()
