"""Wan2.1 VAE: golden parity facts, frame/size rules, causal streaming, file layouts, loader errors, tiling."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import golden_cases
from infinitetalk.checkpoints.materialize import build_on_meta
from infinitetalk.errors import CheckpointError, InputError
from infinitetalk.loaders.vae import infer_vae_config, load_vae
from infinitetalk.models.vae import LATENTS_MEAN, LATENTS_STD, VAEConfig, WanVAE
from infinitetalk.parity.kinds import vae as vae_kind
from infinitetalk.parity.runner import Case, rel_l2
from infinitetalk.tiny import vae as tiny_vae
from infinitetalk.tiny.layouts import random_state_dict

VAE_CASES = golden_cases("vae_encode", "vae_decode")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae_models")
    tiny_vae.write(root, seed=0)
    return root / "vae"


@pytest.fixture(scope="module")
def vae(tiny_dir) -> WanVAE:
    return load_vae(tiny_dir / tiny_vae.FILES["wan_pth"])


def _video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, t, h, w, generator=g) * 2 - 1


# ---- golden cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case_dir", VAE_CASES, ids=lambda p: p.name)
def test_golden_case_and_inferred_config(case_dir):
    case = Case.load(case_dir)
    out = vae_kind.run(case)
    for name, ref in case.expected().items():
        assert rel_l2(out.tensors[name], ref) <= case.tolerance
    # the loader alone (no case config) reads the same architecture off the tensor shapes
    inferred = infer_vae_config(load_file(str(case.weights_path)))
    given = VAEConfig.from_dict(case.config)
    assert (inferred.dim, inferred.dim_mult, inferred.num_res_blocks, inferred.temperal_downsample) == (
        given.dim, given.dim_mult, given.num_res_blocks, given.temperal_downsample)
    assert tuple(inferred.attn_scales) == tuple(float(s) for s in given.attn_scales)
    # production constants are the reference's, as recorded in the case (float32)
    assert torch.equal(torch.tensor(LATENTS_MEAN), torch.tensor(case.config["latents_mean"]))
    assert torch.equal(torch.tensor(LATENTS_STD), torch.tensor(case.config["latents_std"]))


def test_real_config_key_names_and_size():
    model = build_on_meta(lambda: WanVAE(VAEConfig()))
    sd = model.state_dict()
    assert len(sd) == 194
    assert sum(t.numel() for t in sd.values()) == 126_892_531
    assert tuple(sd["conv1.weight"].shape) == (32, 32, 1, 1, 1)
    assert tuple(sd["encoder.downsamples.5.time_conv.weight"].shape) == (192, 192, 3, 1, 1)
    assert tuple(sd["decoder.upsamples.3.time_conv.weight"].shape) == (768, 384, 3, 1, 1)
    assert tuple(sd["decoder.head.2.weight"].shape) == (3, 96, 3, 3, 3)
    assert tuple(sd["encoder.middle.1.norm.gamma"].shape) == (384, 1, 1)
    assert tuple(sd["decoder.middle.0.residual.0.gamma"].shape) == (384, 1, 1, 1)


# ---- shapes, rules, causality -------------------------------------------------------------------------
@pytest.mark.parametrize("t,h,w", [(1, 16, 24), (9, 16, 16), (13, 8, 8)])
def test_shapes_round_trip(vae, t, h, w):
    z = vae.encode(_video(t, h, w))
    k = (t - 1) // 4
    assert z.shape == (16, 1 + k, h // 8, w // 8) and z.dtype == torch.float32
    x = vae.decode(z)
    assert x.shape == (3, t, h, w) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("shape,what", [((3, 4, 16, 16), "1 + 4k"), ((3, 5, 20, 16), "multiples of 8"),
                                        ((4, 5, 16, 16), "[3, T, H, W]"), ((5, 16, 16), "[3, T, H, W]")])
def test_encode_rejects_bad_video(vae, shape, what):
    with pytest.raises(InputError, match="video") as info:
        vae.encode(torch.zeros(shape))
    assert what in str(info.value)


def test_decode_rejects_bad_latent(vae):
    with pytest.raises(InputError, match="latent"):
        vae.decode(torch.zeros(4, 2, 2, 2))
    with pytest.raises(InputError, match="latent"):  # checked at the call, not at the first frame
        vae.decode_stream(torch.zeros(16, 2, 2))


def test_decode_stream_is_causal_and_matches_decode(vae):
    z = vae.encode(_video(13, 8, 16, seed=1))
    parts = list(vae.decode_stream(z))
    assert [p.shape[1] for p in parts] == [1, 4, 4, 4]
    full = vae.decode(z)
    assert torch.equal(torch.cat(parts, dim=1), full)
    # causal: decoding a prefix of the latent gives the prefix of the frames
    assert torch.allclose(vae.decode(z[:, :2]), full[:, :5], atol=1e-6)


def test_encode_is_causal(vae):
    video = _video(9, 16, 16, seed=2)
    assert torch.allclose(vae.encode(video[:, :5]), vae.encode(video)[:, :2], atol=1e-6)
    # a change in the last chunk does not touch earlier latent frames, and does change the last one
    edited = video.clone()
    edited[:, 8] = -edited[:, 8]
    a, b = vae.encode(video), vae.encode(edited)
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2], b[:, 2])


def test_calls_keep_their_own_caches(vae):
    z1 = torch.randn(16, 3, 1, 2, generator=torch.Generator().manual_seed(3))
    z2 = torch.randn(16, 3, 1, 2, generator=torch.Generator().manual_seed(4))
    parts1, parts2 = [], []
    for a, b in zip(vae.decode_stream(z1), vae.decode_stream(z2)):  # two decodes advancing in lockstep
        parts1.append(a)
        parts2.append(b)
    assert torch.equal(torch.cat(parts1, 1), vae.decode(z1)) and torch.equal(torch.cat(parts2, 1), vae.decode(z2))


# ---- files and loader -----------------------------------------------------------------------------
def test_layouts_give_the_same_model(tiny_dir, vae):
    video = _video(5, 16, 16, seed=5)
    z_ref = vae.encode(video)
    x_ref = vae.decode(z_ref)
    comfy = load_vae(tiny_dir / tiny_vae.FILES["comfy"])
    assert comfy.config == vae.config == tiny_vae.TINY_VAE_CONFIG
    assert torch.equal(comfy.encode(video), z_ref) and torch.equal(comfy.decode(z_ref), x_ref)
    # bf16 file: weights rounded to bf16 (rel. 2^-9), computed in fp32 -> close, not equal
    kijai = load_vae(tiny_dir / tiny_vae.FILES["kijai_bf16"])
    assert kijai.conv2.weight.dtype == torch.float32 and kijai.config == vae.config
    assert rel_l2(kijai.encode(video), z_ref) < 2e-2
    assert rel_l2(kijai.decode(z_ref), x_ref) < 5e-2
    # bf16 compute
    half = load_vae(tiny_dir / tiny_vae.FILES["kijai_bf16"], dtype=torch.bfloat16)
    assert half.conv2.weight.dtype == torch.bfloat16
    assert rel_l2(half.decode(z_ref), x_ref) < 1e-1


@pytest.mark.parametrize("prefix", ["model.", "vae.", "first_stage_model."])
def test_prefixed_files_load(tiny_dir, vae, tmp_path, prefix):
    sd = load_file(str(tiny_dir / tiny_vae.FILES["comfy"]))
    path = tmp_path / "wrapped.safetensors"
    save_file({prefix + k: v for k, v in sd.items()}, str(path))
    wrapped = load_vae(path)
    z = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(wrapped.decode(z), vae.decode(z))


def test_non_vae_file_is_refused(tmp_path):
    path = tmp_path / "not_a_vae.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="not_a_vae.safetensors"):
        load_vae(path)


def test_wan22_vae_is_refused(tmp_path):
    sd = {"encoder.conv1.weight": torch.zeros(8, 12, 3, 3, 3), "conv1.weight": torch.zeros(96, 96, 1, 1, 1),
          "conv2.weight": torch.zeros(48, 48, 1, 1, 1), "decoder.conv1.weight": torch.zeros(8, 48, 3, 3, 3),
          "decoder.head.2.weight": torch.zeros(12, 8, 3, 3, 3), "decoder.head.0.gamma": torch.ones(8, 1, 1, 1)}
    path = tmp_path / "wan2.2_vae.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="wan2.2_vae.safetensors.*not a Wan2.1 VAE"):
        load_vae(path)


@pytest.mark.parametrize("cfg", [
    VAEConfig(dim=4, dim_mult=(1, 2, 2, 4), num_res_blocks=1),
    VAEConfig(dim=4, dim_mult=(1, 2, 4), temperal_downsample=(True, False)),
    VAEConfig(dim=4, attn_scales=(0.5, 0.125), num_res_blocks=3),
])
def test_config_is_read_from_shapes(tmp_path, cfg):
    path = tmp_path / "vae.pth"
    torch.save(random_state_dict(build_on_meta(lambda: WanVAE(cfg))), str(path))
    assert load_vae(path).config == cfg


# ---- tiling ---------------------------------------------------------------------------------------
def test_single_tile_is_exact(vae):
    z = torch.randn(16, 2, 3, 5, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(vae.decode(z, tile=(3, 5, 1)), vae.decode(z), atol=1e-6)
    video = _video(5, 16, 24, seed=6)
    assert torch.allclose(vae.encode(video, tile=(2, 3, 1)), vae.encode(video), atol=1e-6)


def test_tiled_decode_seam_bound(vae):
    """Bound measured on the random tiny VAE (seed 0): an 8x8 latent of a smooth 64x64 video.

    Tiles see zeros beyond their border and the middle attention sees only the tile, so tiling is an
    approximation. Random weights have no locality and amplify border effects through ~30 RMS-normed
    convs, so this is a pessimistic setting: measured mean |diff| 0.110 (max 1.35, outputs in [-1, 1])
    for 6x6 tiles overlapping by 4 px, versus 0.273 (max 1.86) for hard 4x4 seams. Bound: mean <= 0.14,
    and blended overlaps must at least halve the mean error of hard seams.
    """
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    frames = [torch.stack([torch.sin(3 * xx + 0.3 * t) * 0.6, torch.cos(2 * yy - 0.2 * t) * 0.6,
                           ((xx - 0.05 * t) ** 2 + yy ** 2 < 0.3).float() * 1.2 - 0.6]) for t in range(5)]
    z = vae.encode(torch.stack(frames, 1))
    full = vae.decode(z)
    tiled = torch.cat(list(vae.decode_stream(z, tile=(6, 6, 4))), dim=1)
    blended = (tiled - full).abs().mean().item()
    hard = (vae.decode(z, tile=(4, 4, 0)) - full).abs().mean().item()
    assert blended <= 0.14
    assert blended <= 0.5 * hard


@pytest.mark.parametrize("tile", [(4, 4, 4), (0, 4, 0), (4, 4, -1), "big"])
def test_bad_tile_is_refused(vae, tile):
    with pytest.raises(InputError, match="tile"):
        vae.decode_stream(torch.zeros(16, 1, 4, 4), tile=tile)
