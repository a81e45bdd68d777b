"""Reader, canonical view (prefixes, both fp8 generations, refused formats) and load_module on small
hand-made modules: every bad file must fail with an error naming it."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from infinitetalk.checkpoints import CheckpointError, build_on_meta, load_module, open_checkpoint
from infinitetalk.checkpoints.layout import canonical_view
from infinitetalk.models.layers import Linear
from infinitetalk.tiny.layouts import (
    random_state_dict, save_fp8_comfy_quant, save_fp8_legacy, save_pth, save_safetensors, save_sharded,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = Linear(8, 6)
        self.norm = nn.LayerNorm(6)
        self.out = Linear(6, 4, bias=False)

    def forward(self, x):
        return self.out(self.norm(self.proj(x)))


@pytest.fixture()
def state():
    return random_state_dict(build_on_meta(Tiny), seed=3)


def _load(path, **kw):
    view = canonical_view(open_checkpoint(path), anchors=["proj.weight"])
    return load_module(build_on_meta(Tiny), view, dtype=torch.float32, scales=view.scales(), source=str(path), **kw)


def _ref(state):
    m = Tiny()
    m.load_state_dict(state)
    return m.eval()


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "model."])
def test_prefixes_are_stripped(tmp_path, state, prefix):
    path = save_safetensors(state, tmp_path / "m.safetensors", prefix=prefix)
    view = canonical_view(open_checkpoint(path), anchors=["proj.weight"])
    assert view.prefix == prefix and set(view) == set(state)
    assert torch.equal(_load(path)(X), _ref(state)(X))


def test_sharded_index_and_folder(tmp_path, state):
    index = save_sharded(state, tmp_path / "wan", 2, metadata={"infinitetalk.num_heads": 2})
    assert index.name == "diffusion_pytorch_model.safetensors.index.json"
    assert sorted(p.name for p in index.parent.glob("*.safetensors")) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    for entry in (index, index.parent):
        ckpt = open_checkpoint(entry)
        assert ckpt.metadata["infinitetalk.num_heads"] == "2"
        assert torch.equal(_load(entry)(X), _ref(state)(X))


def test_pth_plain_and_wrapped(tmp_path, state):
    for wrapper in (None, "state_dict"):
        path = save_pth(state, tmp_path / f"m_{wrapper}.pth", wrapper=wrapper)
        assert torch.equal(_load(path)(X), _ref(state)(X))


def test_fp8_legacy_scaled_stays_fp8_and_matches_dequantised(tmp_path, state):
    path = save_fp8_legacy(state, tmp_path / "m_fp8_scaled.safetensors", prefix="model.diffusion_model.",
                           linear_names=["proj.weight", "out.weight"], marker_dtype=torch.float32)
    raw = open_checkpoint(path)
    view = canonical_view(raw, anchors=["proj.weight"])
    assert view.fp8_storage == torch.float8_e4m3fn  # float32 marker means e4m3fn
    assert set(view.scales()) == {"proj", "out"} and view.scales()["proj"].dim() == 0
    model = _load(path)
    assert model.proj.weight.dtype == torch.float8_e4m3fn and model.proj.weight_scale is not None
    # independent dequantisation from the raw file
    deq = dict(state)
    for layer in ("proj", "out"):
        deq[f"{layer}.weight"] = (raw[f"model.diffusion_model.{layer}.weight"].float()
                                  * raw[f"model.diffusion_model.{layer}.scale_weight"].float())
    deq["proj.bias"] = raw["model.diffusion_model.proj.bias"].float()
    deq["norm.weight"] = raw["model.diffusion_model.norm.weight"].float()
    deq["norm.bias"] = raw["model.diffusion_model.norm.bias"].float()
    torch.testing.assert_close(model(X), _ref(deq)(X), rtol=1e-5, atol=1e-6)
    rel = (model(X) - _ref(state)(X)).norm() / _ref(state)(X).norm()
    assert rel < 0.08


def test_fp8_plain_cast_has_scale_one(tmp_path, state):
    path = save_fp8_legacy(state, tmp_path / "m_fp8_e4m3fn.safetensors", linear_names=["proj.weight"],
                           scaled=False, dtype=torch.float32)
    view = canonical_view(open_checkpoint(path))
    assert view.scales() == {} and view.dtype("proj.weight") == torch.float8_e4m3fn
    model = _load(path)
    assert model.proj.weight.dtype == torch.float8_e4m3fn and model.proj.weight_scale is None
    deq = dict(state, **{"proj.weight": state["proj.weight"].to(torch.float8_e4m3fn).float()})
    torch.testing.assert_close(model(X), _ref(deq)(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_tensor_json,per_row", [(False, False), (True, True), (False, True)])
def test_fp8_comfy_quant(tmp_path, state, per_tensor_json, per_row):
    path = save_fp8_comfy_quant(state, tmp_path / "m.safetensors", prefix="diffusion_model.",
                                linear_names=["proj.weight", "out.weight"], dtype=torch.float32,
                                per_tensor_json=per_tensor_json, per_row=per_row)
    raw = open_checkpoint(path)
    assert ("_quantization_metadata" in raw.metadata) != per_tensor_json
    view = canonical_view(raw, anchors=["proj.weight"])
    assert view.quant_formats == {"proj": "float8_e4m3fn", "out": "float8_e4m3fn"}
    assert "proj.input_scale" not in view and "proj.comfy_quant" not in view
    scale = view.scales()["proj"]
    assert scale.shape == ((6, 1) if per_row else ())
    model = _load(path)
    deq = dict(state)
    for layer in ("proj", "out"):
        s = raw[f"diffusion_model.{layer}.weight_scale"].float()
        deq[f"{layer}.weight"] = raw[f"diffusion_model.{layer}.weight"].float() * (s.reshape(-1, 1) if per_row else s)
    torch.testing.assert_close(model(X), _ref(deq)(X), rtol=1e-5, atol=1e-6)


def test_fp8_stored_as_uint8_bytes_is_viewed(tmp_path, state):
    q = state["proj.weight"].to(torch.float8_e4m3fn)
    tensors = {k: v for k, v in state.items()}
    tensors["proj.weight"] = q.view(torch.uint8)
    tensors["proj.weight_scale"] = torch.tensor(1.0)
    tensors["proj.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    model = _load(tmp_path / "m.safetensors")
    assert model.proj.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(model.proj.weight.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "int8_tensorwise", None])
def test_unknown_quant_formats_are_refused(tmp_path, state, fmt):
    spec = {"format": fmt} if fmt else {"group_size": 16}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"proj": spec}})}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "q.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError) as err:
        canonical_view(open_checkpoint(tmp_path / "q.safetensors"))
    assert "q.safetensors" in str(err.value) and "'proj'" in str(err.value) and repr(fmt) in str(err.value)


def test_refused_quant_via_per_layer_json_and_foreign_scales(tmp_path, state):
    t = dict(state, **{"out.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)})
    save_file(t, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"a\.safetensors.*'out'.*nvfp4"):
        canonical_view(open_checkpoint(tmp_path / "a.safetensors"))
    t = dict(state, **{"out.weight_scale_2": torch.tensor(1.0)})
    save_file(t, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"b\.safetensors.*'out'.*nvfp4"):
        canonical_view(open_checkpoint(tmp_path / "b.safetensors"))


def test_blockwise_scale_is_refused(tmp_path, state):
    t = dict(state)
    t["proj.weight"] = state["proj.weight"].to(torch.float8_e4m3fn)
    t["proj.weight_scale"] = torch.ones(3, 2)
    save_file(t, str(tmp_path / "blk.safetensors"))
    with pytest.raises(CheckpointError, match=r"blk\.safetensors.*'proj'.*per-tensor or per-row"):
        canonical_view(open_checkpoint(tmp_path / "blk.safetensors")).scales()


def test_truncated_safetensors(tmp_path, state):
    path = save_safetensors(state, tmp_path / "trunc.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors.*truncated"):
        open_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        open_checkpoint(path)
    bad = tmp_path / "hdr.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**6) + b"{" + b"\0" * 20)
    with pytest.raises(CheckpointError, match=r"hdr\.safetensors.*header length"):
        open_checkpoint(bad)
    huge = tmp_path / "huge.safetensors"                            # a sparse file: no disk used
    with open(huge, "wb") as f:
        f.write(struct.pack("<Q", 200 * 1024 * 1024) + b"{")
        f.truncate(300 * 1024 * 1024)
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: safetensors header length 209715200 is over the "
                                              r"104857600 bytes"):
        open_checkpoint(huge)


def test_pickle_named_safetensors_is_mislabelled(tmp_path, state):
    for name, kw in (("zip.safetensors", {}), ("legacy.safetensors", {"_use_new_zipfile_serialization": False})):
        torch.save(state, str(tmp_path / name), **kw)
        with pytest.raises(CheckpointError, match=rf"{name}.*mislabelled"):
            open_checkpoint(tmp_path / name)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pth_needing_full_unpickling_is_refused(tmp_path, state, capsys):
    torch.save({"weights": state, "extra": _Evil()}, str(tmp_path / "code.pth"))
    with pytest.raises(CheckpointError, match=r"code\.pth.*refusing full unpickling"):
        open_checkpoint(tmp_path / "code.pth")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(CheckpointError, match=r"raw\.pth"):
        open_checkpoint(tmp_path / "raw.pth")
    assert "must never run" not in capsys.readouterr().out


def test_other_bad_containers(tmp_path, state):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"m\.gguf.*GGUF"):
        open_checkpoint(tmp_path / "m.gguf")
    (tmp_path / "text.safetensors").write_bytes(b"hello, this is not a model at all")
    with pytest.raises(CheckpointError, match=r"text\.safetensors"):
        open_checkpoint(tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match=r"missing\.safetensors.*no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")
    index = save_sharded(state, tmp_path / "shards", 2)
    next(index.parent.glob("*00002*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(index)
    torch.save([1, 2, 3], str(tmp_path / "list.pth"))
    with pytest.raises(CheckpointError, match=r"list\.pth.*state dict"):
        open_checkpoint(tmp_path / "list.pth")


def test_load_module_errors_name_the_file(tmp_path, state):
    missing = {k: v for k, v in state.items() if k != "out.weight"}
    path = save_safetensors(missing, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial\.safetensors.*out\.weight"):
        _load(path)
    wrong = dict(state, **{"proj.weight": torch.zeros(6, 9)})
    path = save_safetensors(wrong, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"shape\.safetensors.*proj\.weight.*\(6, 9\)"):
        _load(path)


def test_scale_with_non_fp8_weight_is_applied(tmp_path, state):
    t = dict(state, **{"proj.scale_weight": torch.tensor([2.0])})
    save_file(t, str(tmp_path / "s.safetensors"))
    deq = dict(state, **{"proj.weight": state["proj.weight"] * 2})
    torch.testing.assert_close(_load(tmp_path / "s.safetensors")(X), _ref(deq)(X))


def test_safetensors_whose_header_length_looks_like_pickle(tmp_path):
    # header length 0x0280 = 640 makes the file start with bytes 80 02, the pickle protocol-2 opcode
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(640)
    path = tmp_path / "len640.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + header + struct.pack("<2f", 1.5, -2.0))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert open_checkpoint(path)["w"].tolist() == [1.5, -2.0]
