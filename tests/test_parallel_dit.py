"""Multi-process DiT on CPU with gloo (loopback only): Ulysses sequence parallelism and guidance parallelism
give the single-process result; a world size the model cannot use is a clear error."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _dit_testutil import random_inputs, random_model, small_config
from infinitetalk.errors import InputError
from infinitetalk.pipeline.sampler import Guidance, WindowConditioning, sample_window
from infinitetalk.pipeline.schedule import timesteps
from infinitetalk.ops.parallel import SequenceGroup, guidance_layout, init_parallel
from infinitetalk.runtime.streaming import BlockStreamer
from infinitetalk.pipeline.teacache import TeaCache

TIMEOUT_S = 120
H, W, FRAMES = 6, 10, 3  # non-square; 3·15 = 45 tokens: odd, so shards are padded and cut latent frames
QUALITY, FAST = Guidance(5.0, 4.0), Guidance(1.0, 2.5)


@pytest.fixture(autouse=True)
def _one_thread():
    """The gloo ranks already fill the cores; a multi-threaded parent on top of them only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(persons: int, heads: int = 4):
    cfg = small_config(dim=16 * heads if heads != 3 else 96, num_heads=heads)
    i = random_inputs(cfg, persons=persons, frames=FRAMES, h=H, w=W)
    null = torch.randn(8, cfg.text_dim, generator=torch.Generator().manual_seed(7))
    cond = WindowConditioning(context=i["context"], context_null=null, clip_fea=i["clip_fea"], y=i["y"],
                              audio=i["audio"], ref_target_masks=i["ref_target_masks"])
    return random_model(cfg), i, cond


def _sample(dit, cond, guidance, batch=1, parallel=None, steps=1, teacache=None):
    noise = torch.randn(16, FRAMES, H, W, generator=torch.Generator().manual_seed(11))
    motion = noise[:, :1] * 0.5
    return sample_window(dit, noise, cond, timesteps(steps, 5.0), guidance, motion, batch=batch, parallel=parallel,
                         teacache=teacache)


def _worker(rank: int, world: int, port: int, out_dir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    state = init_parallel(backend="gloo", device="cpu", timeout_s=TIMEOUT_S)
    results: dict[str, object] = {}
    with torch.inference_mode():
        if scenario == "world2":
            sequence = SequenceGroup(None, state.rank, state.world_size)
            for persons in (1, 2):
                dit, i, cond = _setup(persons)
                results[f"sp{persons}"] = dit(i["x"], i["t"], i["context"], i["clip_fea"], i["y"], i["audio"],
                                              i["ref_target_masks"], sequence=sequence)
                silent = torch.zeros_like(i["audio"][-1:])
                results[f"sp_batch{persons}"] = dit.forward_batch(
                    i["x"], i["t"], [i["context"], cond.context_null, cond.context_null], i["clip_fea"], i["y"],
                    [i["audio"], i["audio"], silent], i["ref_target_masks"], sequence=sequence)
            dit, _, cond = _setup(2)
            streamer = BlockStreamer(dit.blocks, range(len(dit.blocks)), "cpu").install()  # budget: stream all
            results["quality_streamed"] = _sample(dit, cond, QUALITY, batch=True, parallel=state)
            results["streamed_copies"] = streamer.copies
            streamer.remove("cpu")
            results["fast"] = _sample(dit, cond, FAST, parallel=state)          # 2 groups of 1 rank
            results["quality"] = _sample(dit, cond, QUALITY, batch=True, parallel=state)  # 1 group, sequence over 2
            # ranks whose memory plans allow different guidance batches must still pair their all-to-alls
            results["quality_uneven_batch"] = _sample(dit, cond, QUALITY, batch=3 if rank == 0 else 1, parallel=state)
            cache = TeaCache(0.2)
            results["teacache"] = _sample(dit, cond, QUALITY, parallel=state, steps=3, teacache=cache)
            results["teacache_decisions"] = cache.decisions
            dit3, i3, cond3 = _setup(2, heads=3)
            results["fast_3heads"] = _sample(dit3, cond3, FAST, parallel=state)  # no sequence split needed
            results["quality_3heads"] = _sample(dit3, cond3, QUALITY, parallel=state)  # 2 groups: calls 0+2, 1
            try:
                dit3(**i3, sequence=SequenceGroup(None, state.rank, state.world_size))
            except InputError as e:
                results["sequence_3heads_error"] = str(e)
        elif scenario == "world4":
            dit, _, cond = _setup(2)
            results["fast"] = _sample(dit, cond, FAST, batch=True, parallel=state)  # 2 groups × sequence over 2
            results["quality"] = _sample(dit, cond, QUALITY, parallel=state)        # 1 group, sequence over 4
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    state.shutdown()


def _launch(world: int, scenario: str, tmp_path: Path) -> list[dict]:
    ctx = mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), scenario), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} gloo processes did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _same_on_every_rank(ranks: list[dict], key: str) -> torch.Tensor:
    for other in ranks[1:]:
        assert torch.equal(other[key], ranks[0][key]), f"{key}: ranks disagree"
    return ranks[0][key]


def test_guidance_layout():
    assert guidance_layout(1, 3) == (1, 1)
    assert guidance_layout(2, 2) == (2, 1)
    assert guidance_layout(2, 3, num_heads=40) == (1, 2)       # 3 calls, sequence over 2
    assert guidance_layout(2, 3, num_heads=3) == (2, 1)        # 3 heads: 2 groups take the calls in turn
    assert guidance_layout(4, 2, num_heads=40) == (2, 2)
    assert guidance_layout(6, 3, num_heads=40) == (3, 2)
    assert guidance_layout(4, 2, guidance_parallel=False) == (1, 4)
    # no layout of all W ranks splits the heads: the quickest one on fewer ranks, the rest sit the step out
    assert guidance_layout(4, 3, num_heads=3) == (3, 1)        # groups of 4 or 2 ranks cannot split 3 heads
    assert guidance_layout(3, 2, num_heads=40) == (2, 1)       # fast on 3 ranks: rank 2 adds zeros
    assert guidance_layout(6, 2, num_heads=40) == (1, 5)       # 2 calls over 5 ranks beat 1 call over 2
    assert guidance_layout(7, 3, num_heads=40) == (3, 2)
    with pytest.raises(InputError, match="world_size.*2 guidance calls.*3 heads"):
        guidance_layout(2, 2, guidance_parallel=False, num_heads=3)   # one group of all ranks was demanded


def test_world_size_2_matches_one_process(tmp_path):
    ranks = _launch(2, "world2", tmp_path)
    with torch.inference_mode():
        for persons in (1, 2):
            dit, i, cond = _setup(persons)
            ref = dit(i["x"], i["t"], i["context"], i["clip_fea"], i["y"], i["audio"], i["ref_target_masks"])
            assert _rel_l2(_same_on_every_rank(ranks, f"sp{persons}"), ref) <= 1e-5
            batch = _same_on_every_rank(ranks, f"sp_batch{persons}")
            silent = torch.zeros_like(i["audio"][-1:])
            for b, (context, audio) in enumerate([(i["context"], i["audio"]), (cond.context_null, i["audio"]),
                                                  (cond.context_null, silent)]):
                one = dit(i["x"], i["t"], context, i["clip_fea"], i["y"], audio, i["ref_target_masks"])
                assert _rel_l2(batch[b], one) <= 1e-5
        dit, _, cond = _setup(2)
        for key, guidance in (("fast", FAST), ("quality", QUALITY), ("quality_streamed", QUALITY),
                              ("quality_uneven_batch", QUALITY)):
            ref = _sample(dit, cond, guidance)
            assert _rel_l2(_same_on_every_rank(ranks, key), ref) <= 1e-5, key
        assert all(r["streamed_copies"] > 0 for r in ranks)   # the blocks really streamed under sequence parallel
        cache = TeaCache(0.2)
        ref = _sample(dit, cond, QUALITY, steps=3, teacache=cache)
        assert not all(c for _, _, c in cache.decisions)  # a step was skipped
        assert _rel_l2(_same_on_every_rank(ranks, "teacache"), ref) <= 1e-5
        assert all(r["teacache_decisions"] == cache.decisions for r in ranks)
        dit3, _, cond3 = _setup(2, heads=3)
        assert _rel_l2(_same_on_every_rank(ranks, "fast_3heads"), _sample(dit3, cond3, FAST)) <= 1e-5
        assert _rel_l2(_same_on_every_rank(ranks, "quality_3heads"), _sample(dit3, cond3, QUALITY)) <= 1e-5
    for r in ranks:  # a sequence split over 2 ranks cannot divide 3 heads: refused before any collective
        message = r.get("sequence_3heads_error", "")
        assert "3 heads" in message and "2 ranks" in message and "world_size" in message, message


@pytest.mark.slow
def test_world_size_4_guidance_groups_with_sequence_parallel(tmp_path):
    ranks = _launch(4, "world4", tmp_path)
    dit, _, cond = _setup(2)
    with torch.inference_mode():
        assert _rel_l2(_same_on_every_rank(ranks, "fast"), _sample(dit, cond, FAST)) <= 1e-5
        assert _rel_l2(_same_on_every_rank(ranks, "quality"), _sample(dit, cond, QUALITY)) <= 1e-5
