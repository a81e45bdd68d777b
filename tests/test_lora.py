"""LoRA merging: W + strength * up @ down * alpha / rank (ComfyUI convention), diff / diff_b, every key
style, fp8 layers, and the errors for LoRAs that do not fit."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from infinitetalk.checkpoints import CheckpointError, open_checkpoint
from infinitetalk.checkpoints.layout import canonical_view
from infinitetalk.checkpoints import build_on_meta, load_module
from infinitetalk.checkpoints.lora import apply_loras, attach_low_rank
from infinitetalk.models.layers import Linear
from torch import nn
from infinitetalk.tiny.layouts import random_lora, save_fp8_comfy_quant, save_lora

G = torch.Generator().manual_seed(7)
BASE = {
    "blocks.0.self_attn.q.weight": torch.randn(8, 6, generator=G),
    "blocks.0.self_attn.q.bias": torch.randn(8, generator=G),
    "blocks.0.ffn.0.weight": torch.randn(12, 8, generator=G),
    "blocks.0.ffn.0.bias": torch.randn(12, generator=G),
    "blocks.0.norm3.weight": torch.randn(8, generator=G),
    "blocks.0.modulation": torch.randn(1, 6, 8, generator=G),
}
LINEARS = ["blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight"]


def _manual(lora: dict[str, torch.Tensor], strength: float, base=BASE) -> dict[str, torch.Tensor]:
    """Expected merge, written out per key with the lora file's (bf16-rounded) values."""
    out = {k: v.clone().float() for k, v in base.items()}
    for w in LINEARS:
        m = w[: -len(".weight")]
        if f"{m}.lora_up.weight" in lora:
            up = lora[f"{m}.lora_up.weight"].bfloat16().float()
            down = lora[f"{m}.lora_down.weight"].bfloat16().float()
            alpha = float(lora[f"{m}.alpha"]) / down.shape[0] if f"{m}.alpha" in lora else 1.0
            out[w] += strength * alpha * (up @ down)
    for k, v in lora.items():
        if k.endswith(".diff_b"):
            out[k[: -len(".diff_b")] + ".bias"] += strength * v.bfloat16().float()
        elif k.endswith(".diff"):
            m = k[: -len(".diff")]
            target = m + ".weight" if m + ".weight" in out else m
            out[target] += strength * v.bfloat16().float()
    return out


@pytest.mark.parametrize("prefix,peft", [("diffusion_model.", False), ("lora_unet_", False),
                                         ("transformer.", True), ("model.diffusion_model.", False), ("", False)])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_merge_matches_manual(tmp_path, prefix, peft, alpha):
    lora = random_lora(BASE, rank=4, seed=1, linear_names=LINEARS, alpha=alpha, std=0.5,
                       diff_names=["blocks.0.norm3", "blocks.0.modulation"], diff_b_names=["blocks.0.self_attn.q"])
    path = save_lora(lora, tmp_path / "l.safetensors", prefix=prefix, peft_names=peft)
    merged, scales = apply_loras(BASE, {}, [(path, 0.7)])
    expected = _manual(lora, 0.7)
    assert scales == {}
    for k in BASE:
        torch.testing.assert_close(merged[k].float(), expected[k], rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged["blocks.0.self_attn.q.weight"], BASE["blocks.0.self_attn.q.weight"])
    # the base tensors themselves are untouched
    assert torch.equal(BASE["blocks.0.norm3.weight"], BASE["blocks.0.norm3.weight"].clone())


def test_alpha_over_rank_is_applied(tmp_path):
    lora = random_lora(BASE, rank=4, seed=2, linear_names=LINEARS[:1], alpha=1.0, std=0.5)
    merged, _ = apply_loras(BASE, {}, [(save_lora(lora, tmp_path / "a.safetensors", dtype=torch.float32), 1.0)])
    up, down = lora["blocks.0.self_attn.q.lora_up.weight"], lora["blocks.0.self_attn.q.lora_down.weight"]
    delta = merged["blocks.0.self_attn.q.weight"] - BASE["blocks.0.self_attn.q.weight"]
    torch.testing.assert_close(delta, (up @ down) / 4, rtol=1e-5, atol=1e-6)


def test_several_loras_add_up(tmp_path):
    a = random_lora(BASE, rank=2, seed=3, linear_names=LINEARS, std=0.5)
    b = random_lora(BASE, rank=3, seed=4, linear_names=LINEARS[:1], alpha=6.0, std=0.5)
    pa, pb = save_lora(a, tmp_path / "a.safetensors"), save_lora(b, tmp_path / "b.safetensors", prefix="lora_unet_")
    merged, _ = apply_loras(BASE, {}, [(pa, 1.0), (pb, -0.5)])
    ea, eb = _manual(a, 1.0), _manual(b, -0.5)
    for k in LINEARS:
        expected = BASE[k] + (ea[k] - BASE[k]) + (eb[k] - BASE[k])
        torch.testing.assert_close(merged[k], expected, rtol=1e-5, atol=1e-5)


def test_diff_m_is_skipped_like_comfyui(tmp_path):
    lora = random_lora(BASE, rank=2, seed=5, linear_names=LINEARS[:1], std=0.5)
    lora["blocks.0.diff_m"] = torch.ones(1, 6, 8)
    merged, _ = apply_loras(BASE, {}, [(save_lora(lora, tmp_path / "m.safetensors"), 1.0)])
    assert torch.equal(merged["blocks.0.modulation"], BASE["blocks.0.modulation"])


def _fp8_view(tmp_path, per_row=True):
    path = save_fp8_comfy_quant(BASE, tmp_path / "fp8.safetensors", linear_names=LINEARS, dtype=torch.float32,
                                per_row=per_row)
    raw = open_checkpoint(path)
    return raw, canonical_view(raw)


def test_fp8_layer_keeps_fp8_and_gets_a_low_rank_path(tmp_path):
    raw, view = _fp8_view(tmp_path)
    scales = view.scales()
    assert set(scales) == {"blocks.0.self_attn.q", "blocks.0.ffn.0"}
    lora = random_lora(BASE, rank=2, seed=6, linear_names=LINEARS[:1], std=0.5, alpha=1.0)
    merged, kept = apply_loras(view, scales, [(save_lora(lora, tmp_path / "l.safetensors"), 0.5)])
    assert set(kept) == set(scales)  # both layers stay fp8 with their scales
    for k in LINEARS:
        assert merged[k].dtype == torch.float8_e4m3fn and merged.dtype(k) == torch.float8_e4m3fn
    assert set(merged.low_rank) == {"blocks.0.self_attn.q.weight"}
    paths = merged.low_rank_paths(torch.float32, "cpu")
    down, up = paths["blocks.0.self_attn.q"]
    want_up = lora["blocks.0.self_attn.q.lora_up.weight"].bfloat16().float() * 0.5 * (1.0 / 2)
    torch.testing.assert_close(up, want_up)
    torch.testing.assert_close(down, lora["blocks.0.self_attn.q.lora_down.weight"].bfloat16().float())


def test_diff_on_fp8_layer_is_merged_and_its_scale_dropped(tmp_path):
    raw, view = _fp8_view(tmp_path)
    lora = {"blocks.0.self_attn.q.diff": torch.randn(8, 6, generator=G)}
    merged, kept = apply_loras(view, view.scales(), [(save_lora(lora, tmp_path / "d.safetensors"), 1.0)])
    assert set(kept) == {"blocks.0.ffn.0"} and merged.scales().keys() == kept.keys()
    w = merged["blocks.0.self_attn.q.weight"]
    assert w.dtype == torch.float32 and merged.dtype("blocks.0.self_attn.q.weight") == torch.float32
    deq = raw["blocks.0.self_attn.q.weight"].float() * raw["blocks.0.self_attn.q.weight_scale"].float()[:, None]
    torch.testing.assert_close(w, deq + lora["blocks.0.self_attn.q.diff"].bfloat16().float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_row", [False, True])
def test_low_rank_linear_matches_bf16_merge(tmp_path, per_row):
    """Loaded module: fp8 weights stay fp8 and the output matches dequantise + merge within bf16 rounding."""
    shapes = {"q": (32, 48), "up": (64, 32)}
    base = {f"{m}.weight": torch.randn(s, generator=G) for m, s in shapes.items()}
    base.update({f"{m}.bias": torch.randn(s[0], generator=G) for m, s in shapes.items()})
    names = [f"{m}.weight" for m in shapes]
    raw = open_checkpoint(save_fp8_comfy_quant(base, tmp_path / "base.safetensors", linear_names=names,
                                               dtype=torch.float32, per_row=per_row))
    view = canonical_view(raw)
    a = save_lora(random_lora(base, rank=4, seed=11, linear_names=names, alpha=2.0, std=1.0), tmp_path / "a.safetensors")
    b = save_lora(random_lora(base, rank=2, seed=12, linear_names=names[:1], std=1.0), tmp_path / "b.safetensors",
                  prefix="lora_unet_")
    loras = [(a, 0.8), (b, -0.4)]

    def build(tensors, scales):
        model = build_on_meta(lambda: nn.ModuleDict({m: Linear(s[1], s[0]) for m, s in shapes.items()}))
        load_module(model, tensors, dtype=torch.bfloat16, scales=scales)
        attach_low_rank(model, tensors, dtype=torch.bfloat16, device="cpu")
        return model

    merged, scales = apply_loras(view, view.scales(), loras, dtype=torch.bfloat16)
    fp8 = build(merged, scales)
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    plain = build(view, view.scales())
    # the reference: dequantise in float32, merge every LoRA in float32, store bf16 (the old behaviour)
    ref_tensors = {k: view[k].float() for k in view}
    for k in names:
        ref_tensors[k] = ref_tensors[k] * scales[k[: -len(".weight")]].float()
    ref_merged, _ = apply_loras(ref_tensors, {}, loras, dtype=torch.bfloat16)
    ref = build(ref_merged, {})
    x = torch.randn(2, 5, 48, generator=G).bfloat16()
    for layer, (out_f, in_f) in shapes.items():
        got_mod, ref_mod = fp8.get_submodule(layer), ref.get_submodule(layer)
        assert got_mod.weight.dtype == torch.float8_e4m3fn and got_mod.weight_scale is not None
        assert ref_mod.weight.dtype == torch.bfloat16 and ref_mod.lora_down is None
        assert got_mod.lora_down.shape == (6 if layer.endswith("q") else 4, in_f)
        xi = x[..., :in_f]
        want, got = ref_mod(xi).float(), got_mod(xi).float()
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # bf16 rounding, nothing more
        assert (plain.get_submodule(layer)(xi).float() - want).abs().max() > 0.05 * want.abs().max()
    assert nbytes(fp8) < 1.5 * nbytes(plain)  # tiny layers: rank 6 of 32-64 wide; see benchmarks/lora_fp8.py


def test_targets_missing_from_model(tmp_path):
    lora = random_lora(BASE, rank=2, seed=8, linear_names=LINEARS, std=0.5)
    lora["blocks.7.cross_attn.k_img.lora_down.weight"] = torch.zeros(2, 6)
    lora["blocks.7.cross_attn.k_img.lora_up.weight"] = torch.zeros(8, 2)
    path = save_lora(lora, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*1 LoRA target.*blocks\.7\.cross_attn\.k_img\.weight"):
        apply_loras(BASE, {}, [(path, 1.0)])


def test_lora_for_another_architecture(tmp_path):
    other = {"single_blocks.0.linear1.lora_down.weight": torch.zeros(2, 6),
             "single_blocks.0.linear1.lora_up.weight": torch.zeros(8, 2)}
    save_file(other, str(tmp_path / "flux.safetensors"))
    with pytest.raises(CheckpointError, match=r"flux\.safetensors.*another architecture.*single_blocks"):
        apply_loras(BASE, {}, [(tmp_path / "flux.safetensors", 1.0)])
    wrong_size = random_lora({k: torch.zeros(16, 6) for k in LINEARS}, rank=2, linear_names=LINEARS)
    with pytest.raises(CheckpointError, match=r"big\.safetensors.*another architecture"):
        apply_loras(BASE, {}, [(save_lora(wrong_size, tmp_path / "big.safetensors"), 1.0)])


def test_not_a_lora(tmp_path):
    save_file({k: v.contiguous() for k, v in BASE.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a LoRA"):
        apply_loras(BASE, {}, [(tmp_path / "model.safetensors", 1.0)])
    save_file({"blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 6)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match=r"half\.safetensors.*only one of"):
        apply_loras(BASE, {}, [(tmp_path / "half.safetensors", 1.0)])
    save_file({"blocks.0.self_attn.q.dora_scale": torch.zeros(8, 1)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(CheckpointError, match=r"dora\.safetensors.*DoRA"):
        apply_loras(BASE, {}, [(tmp_path / "dora.safetensors", 1.0)])


def test_no_loras_is_identity():
    merged, scales = apply_loras(BASE, {"x": torch.tensor(1.0)}, [])
    assert merged is BASE and set(scales) == {"x"}


@pytest.mark.slow  # writes header-only copies of the real 14B files (a few seconds)
def test_distill_lora_on_real_fp8_dit_adds_under_5_percent(tmp_path):
    """Real shapes (header-only files): Comfy-Org fp8_scaled 14B DiT + lightx2v rank-64 distill LoRA."""
    import math

    from infinitetalk.checkpoints import FP8_DTYPES
    from infinitetalk.tiny.sparse import REAL_FILES, write_real_layouts

    write_real_layouts(tmp_path)
    view = canonical_view(open_checkpoint(tmp_path / REAL_FILES["dit"]))
    merged, kept = apply_loras(view, view.scales(), [(tmp_path / REAL_FILES["lora"], 1.0)], dtype=torch.bfloat16)
    assert kept.keys() == view.scales().keys() and not any(merged.dtype(k) not in FP8_DTYPES
                                                           for k in merged.low_rank)
    stored = sum(math.prod(view.shape(k)) * (1 if view.dtype(k) in FP8_DTYPES else 2) for k in view)
    extra = sum(sum(t.ckpt.shape(t.keys[0])[0] for t in terms) * sum(view.shape(target)) * 2
                for target, terms in merged.low_rank.items())
    assert len(merged.low_rank) == 480 and extra / stored < 0.05  # 4.3 %
