"""umT5 text encoder: file layouts, tokenizer sources, padding behaviour, errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from infinitetalk.errors import CheckpointError, InputError
from infinitetalk.loaders.t5 import load_t5_encoder, load_text_encoder
from infinitetalk.parity.runner import rel_l2
from infinitetalk.text import DEFAULT_NEGATIVE_PROMPT, TEXT_LENGTH, UMT5Tokenizer, clean_prompt
from infinitetalk.tiny import make_tiny_models
from infinitetalk.tiny import t5 as tiny_t5

PROMPT = "A woman  speaks warmly to the camera &amp; smiles,\n\tthen nods."


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5models")
    make_tiny_models(root, seed=0, components=("t5",))
    return root / "text_encoders"


def _load(path, **kw):
    return load_text_encoder(path, dtype=torch.float32, **kw)


def test_layouts_give_the_same_context(text_dir):
    wan = _load(text_dir / tiny_t5.FILES["wan_pth"]).encode(PROMPT)
    fp16 = _load(text_dir / tiny_t5.FILES["comfy_fp16"]).encode(PROMPT)
    fp8 = _load(text_dir / tiny_t5.FILES["comfy_fp8"]).encode(PROMPT)
    other_seed = load_t5_encoder(text_dir / tiny_t5.FILES["wan_pth"], dtype=torch.float32)
    assert wan.shape == fp16.shape == fp8.shape
    # .pth is bf16, the Comfy file fp16: storage rounding only
    assert rel_l2(fp16, wan) < 0.03
    # fp8 e4m3 with per-tensor scales: coarse but the same function (an unrelated model is ~1.0 away)
    assert rel_l2(fp8, fp16) < 0.3
    sd = tiny_t5.state_dict(seed=1)
    other_seed.load_state_dict(sd)
    ids, mask = _load(text_dir / tiny_t5.FILES["comfy_fp16"]).tokenizer(PROMPT, pad=False)
    assert rel_l2(other_seed(ids, mask)[0], fp16) > 0.5


def test_fp8_weights_stay_fp8_with_scales(text_dir):
    te = load_text_encoder(text_dir / tiny_t5.FILES["comfy_fp8"], dtype=torch.bfloat16)
    q = te.model.blocks[0].attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None
    assert te.model.token_embedding.weight.dtype == torch.bfloat16


def test_embedded_and_file_tokenizers_agree(text_dir):
    embedded = _load(text_dir / tiny_t5.FILES["comfy_fp16"]).tokenizer
    beside = _load(text_dir / tiny_t5.FILES["wan_pth"]).tokenizer
    assert "spiece_model" in embedded.source and beside.source.endswith(".model")
    assert embedded.serialized() == beside.serialized()
    ids = embedded.encode(PROMPT)
    assert ids == beside.encode(PROMPT)
    assert ids[-1] == embedded.eos_id == 1 and embedded.pad_id == 0
    assert embedded.decode(ids) == clean_prompt(PROMPT) == "A woman speaks warmly to the camera & smiles, then nods."


def test_tokenizer_padding_and_truncation(text_dir):
    tok = UMT5Tokenizer.from_file(text_dir / tiny_t5.FILES["tokenizer"])
    ids, mask = tok(PROMPT)
    n = len(tok.encode(PROMPT))
    assert ids.shape == mask.shape == (1, TEXT_LENGTH)
    assert int(mask.sum()) == n and bool((ids[0, n:] == 0).all()) and int(ids[0, n - 1]) == 1
    long_ids = tok.encode("camera " * 2000)
    assert len(long_ids) == TEXT_LENGTH and long_ids[-1] == 1


def test_tokenizer_is_deterministic(text_dir):
    assert tiny_t5.tokenizer_bytes() == (text_dir / tiny_t5.FILES["tokenizer"]).read_bytes()


def test_encode_returns_real_rows_equal_to_padded_run(text_dir):
    te = _load(text_dir / tiny_t5.FILES["comfy_fp16"])
    out = te.encode(PROMPT)
    n = len(te.tokenizer.encode(PROMPT))
    assert out.shape == (n, tiny_t5.TINY_T5_CONFIG.dim)
    ids, mask = te.tokenizer(PROMPT)  # padded to 512 as the reference runs it
    padded = te.model(ids, mask)[0]
    assert rel_l2(out, padded[:n]) < 1e-5
    # the mask matters: attending to the padding changes the real rows
    assert rel_l2(te.model(ids)[0, :n], padded[:n]) > 1e-2


def test_tokenizer_found_in_wan_folder_layout(text_dir, tmp_path):
    shutil.copy(text_dir / tiny_t5.FILES["wan_pth"], tmp_path / "model.pth")
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    shutil.copy(text_dir / tiny_t5.FILES["tokenizer"], tmp_path / "google" / "umt5-xxl" / "spiece.model")
    te = _load(tmp_path / "model.pth")
    assert te.tokenizer.source.endswith("spiece.model")
    assert te.encode(PROMPT).shape[0] == len(te.tokenizer.encode(PROMPT))


def test_missing_tokenizer_error_names_the_checkpoint(text_dir, tmp_path):
    lonely = tmp_path / "lonely_umt5.pth"
    shutil.copy(text_dir / tiny_t5.FILES["wan_pth"], lonely)
    with pytest.raises(CheckpointError, match="lonely_umt5.pth.*tokenizer"):
        _load(lonely)
    # an explicit tokenizer makes it work; a wrong explicit path is a user-input error
    assert _load(lonely, tokenizer=text_dir / tiny_t5.FILES["tokenizer"]).encode("hi").shape[0] >= 1
    assert _load(lonely, tokenizer=text_dir).encode("hi").shape[0] >= 1
    with pytest.raises(InputError, match="tokenizer"):
        _load(lonely, tokenizer=tmp_path / "nope.model")


def test_wrong_component_and_t5_v1_1_refused(text_dir, tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "not_t5.safetensors"
    save_file({"visual.transformer.0.attn.to_qkv.weight": torch.zeros(6, 2)}, str(junk))
    with pytest.raises(CheckpointError, match="not_t5.safetensors.*not a umT5"):
        _load(junk)
    hf = tiny_t5.hf_state_dict(tiny_t5.state_dict())
    del hf["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    v11 = tmp_path / "t5xxl_fp16.safetensors"
    save_file(hf, str(v11))
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        _load(v11, tokenizer=text_dir / tiny_t5.FILES["tokenizer"])


def test_negative_prompt_is_the_english_reference_text():
    parts = [p.strip() for p in DEFAULT_NEGATIVE_PROMPT.split(",")]
    assert parts[0] == "bright tones" and parts[-1] == "walking backwards"
    assert "JPEG compression residue" in parts and len(parts) == 28
    assert DEFAULT_NEGATIVE_PROMPT.isascii()


def test_real_size_names_and_shapes_match_the_wan_checkpoint():
    """umT5-XXL built on meta has exactly the key names/shapes of models_t5_umt5-xxl-enc-bf16.pth."""
    from infinitetalk.checkpoints.materialize import build_on_meta
    from infinitetalk.models.t5 import T5Config, T5Encoder

    sd = build_on_meta(lambda: T5Encoder(T5Config())).state_dict()
    assert len(sd) == 2 + 24 * 10
    assert sd["token_embedding.weight"].shape == (256384, 4096)
    assert sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert sd["blocks.0.ffn.gate.0.weight"].shape == (10240, 4096)
    assert sd["blocks.0.ffn.fc2.weight"].shape == (4096, 10240)
    assert {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")} == {
        "norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
        "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight"}


def test_encode_is_the_same_on_one_thread_and_on_all(text_dir):
    """torchrun gives each rank OMP_NUM_THREADS=1 while one process uses every core: the context must not
    depend on that (the CPU fused attention kernel's rounding did, and 40 steps made it visible in frames)."""
    path = text_dir / tiny_t5.FILES["comfy_fp16"]
    te = _load(path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [te.encode(p) for p in (PROMPT, DEFAULT_NEGATIVE_PROMPT)]
        torch.set_num_threads(max(2, threads))
        many = [te.encode(p) for p in (PROMPT, DEFAULT_NEGATIVE_PROMPT)]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b), f"{path.name}: differs by {(a - b).abs().max().item():.3g}"
