"""Kernels: attention backends by name, fp8 `_scaled_mm` matmul (maths + dispatch), torch.compile wiring."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from infinitetalk.errors import InputError
from infinitetalk.models.attention import attention, check_backend
from infinitetalk.models.layers import FP8_MAX, Linear, dequantize, scaled_mm_linear
from infinitetalk.ops import attention as rt_attention
from infinitetalk.ops.options import RuntimeOptions
from infinitetalk.runtime import kernels
from infinitetalk.runtime.kernels import configure_dit, fp8_matmul_supported

from _dit_testutil import random_inputs, random_model, run, small_config

G = torch.Generator().manual_seed(3)


@pytest.fixture(autouse=True)
def _restore_resolved_kernels():
    """Tests put stand-in packages' kernels into the resolver's cache; later tests must not see them."""
    saved = dict(rt_attention._resolved)
    yield
    rt_attention._resolved.clear()
    rt_attention._resolved.update(saved)


def _qkv(dtype=torch.float32):
    return [torch.randn(2, 4, 10, 16, generator=G).to(dtype) for _ in range(3)]


# ---------------------------------------------------------------- attention by name
def test_math_matches_sdpa():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, "math"), attention(q, k, v, "sdpa"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flsh", "xformers", ""])
def test_unknown_backend_is_a_clear_error(name):
    with pytest.raises(InputError, match=r"attention: unknown attention backend .*auto, sdpa, cudnn, flash, fa3, "
                                         r"sage, math"):
        check_backend(name)
    with pytest.raises(InputError, match="unknown attention backend"):
        rt_attention.resolve_attention(name)


@pytest.mark.parametrize("name,package,pip", [("flash", "flash_attn", "flash-attn"),
                                              ("sage", "sageattention", "sageattention")])
def test_missing_package_names_it(monkeypatch, tmp_path, name, package, pip):
    monkeypatch.setitem(sys.modules, package, None)  # import fails even where the package is installed
    rt_attention._resolved.pop(name, None)
    with pytest.raises(InputError, match=rf"backend '{name}' needs the Python package '{package}'.*pip install {pip}"):
        rt_attention.resolve_attention(name)
    assert not rt_attention.attention_available(name)
    with pytest.raises(InputError, match=package):
        configure_dit(random_model(small_config(num_layers=1)), RuntimeOptions(attention=name), "cpu")
    # the loader refuses it before reading any weights (a 14B DiT takes minutes to load)
    import infinitetalk.loaders as loaders
    from infinitetalk.pipeline import models as pipeline_models

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the attention backend was checked")

    monkeypatch.setattr(loaders, "load_dit", no_loading)
    monkeypatch.setattr(pipeline_models, "resolve_model_paths", lambda *a, **k: None)
    with pytest.raises(InputError, match=package):
        pipeline_models.load_models(tmp_path, device="cpu", runtime=RuntimeOptions(attention=name))


@pytest.mark.parametrize("device,cap,fa3,order", [
    ("cpu", None, True, ("sdpa",)),
    ("cuda", (8, 0), True, ("sdpa",)),                    # A100: SDPA's FlashAttention-2
    ("cuda", (8, 9), False, ("sdpa",)),
    ("cuda", (9, 0), False, ("cudnn", "sdpa")),           # H100/H200: cuDNN attention inside SDPA
    ("cuda", (9, 0), True, ("fa3", "cudnn", "sdpa")),     # FA3 when installed
    ("cuda", (10, 0), True, ("cudnn", "sdpa")),           # FA3 is a Hopper kernel
])
def test_auto_order_by_device(device, cap, fa3, order):
    asked = []
    assert rt_attention.auto_order(device, cap, lambda n: asked.append(n) or (fa3 and n == "fa3")) == order
    assert set(asked) <= {"fa3"}   # sage (lossy) is never considered


def test_auto_falls_back_when_a_kernel_refuses_a_shape(monkeypatch, caplog):
    tried, oom = [], []

    def flash_attn_func(q, k, v):   # like a kernel refusing stride-0 batch K/V
        tried.append(k.stride(0))
        if oom:
            raise torch.OutOfMemoryError("out of memory")
        if k.stride(0) == 0:
            raise RuntimeError("k must have contiguous batch")
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    rt_attention._resolved.pop("fa3", None)
    monkeypatch.setitem(rt_attention._orders, torch.device("cpu"), ("fa3", "sdpa"))
    q, k, v = _qkv(torch.bfloat16)
    torch.testing.assert_close(attention(q, k, v, "auto"), attention(q, k, v, "fa3"))
    k1, v1 = k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)
    with caplog.at_level("WARNING"):
        out = attention(q, k1, v1, "auto")
        attention(q, k1, v1, "auto")
    torch.testing.assert_close(out, attention(q, k1, v1, "sdpa"))
    assert sum("fa3 refused" in r.getMessage() for r in caplog.records) == 1   # said once, not per call
    assert tried.count(0) == 1   # a refused shape is not tried again on every call
    oom.append(True)
    with pytest.raises(torch.OutOfMemoryError):   # memory is not a refused shape: no silent fallback
        attention(q, k, v, "auto")


def test_auto_skips_a_backend_that_is_missing_or_does_not_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)   # installed nowhere
    rt_attention._resolved.pop("fa3", None)
    assert not rt_attention._usable("fa3")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.ModuleType("flash_attn_interface"))
    real_import = rt_attention.importlib.import_module

    def import_module(name, *args):
        if name == "flash_attn_interface":
            raise OSError("undefined symbol in the CUDA build")
        return real_import(name, *args)

    monkeypatch.setattr(rt_attention.importlib, "import_module", import_module)
    assert not rt_attention._usable("fa3")   # a broken build costs speed, not the job
    assert rt_attention._usable("cudnn") and rt_attention._usable("sdpa")


def test_cudnn_first_sdpa_is_sdpa_where_cudnn_is_absent():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, "cudnn"), attention(q, k, v, "sdpa"))
    assert RuntimeOptions().attention == "auto"


def _fake_packages(monkeypatch, calls):
    """Stand-ins with the real packages' call signatures (flash: [b, s, h, d]; sage: layout argument)."""
    def flash_attn_func(q, k, v):
        calls.append(("flash", q.dtype, q.shape))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def sageattn(q, k, v, tensor_layout="HND"):
        assert tensor_layout == "HND"
        calls.append(("sage", q.dtype, q.shape))
        return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    for name in ("flash", "sage"):
        rt_attention._resolved.pop(name, None)


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_optional_backends_layout_and_dtype(monkeypatch, name):
    calls: list = []
    _fake_packages(monkeypatch, calls)
    q, k, v = _qkv()
    out = attention(q, k, v, name)
    # float32 goes through bf16 (the kernels take half precision only) and comes back float32
    assert out.dtype == torch.float32 and calls[-1][1] == torch.bfloat16
    assert calls[-1][2] == ((2, 10, 4, 16) if name == "flash" else (2, 4, 10, 16))
    torch.testing.assert_close(out, attention(q, k, v, "sdpa"), rtol=2e-2, atol=2e-2)


def test_configure_dit_sets_backend(monkeypatch):
    calls: list = []
    _fake_packages(monkeypatch, calls)
    cfg = small_config(num_layers=1)
    # one person: with two, a float32 model's speaker routing compares bf16 attention maps to float32 ones
    model, inputs = random_model(cfg), random_inputs(cfg, persons=1)
    want = run(model, inputs)
    report = configure_dit(model, RuntimeOptions(attention="flash"), "cpu")
    assert report.attention == "flash" and model.attention == "flash"
    got = run(model, inputs)
    assert calls and (got - want).abs().max() <= 2e-2 * want.abs().max()


# ---------------------------------------------------------------- fp8 matmul
def _fp8_linear(out_f=32, in_f=48, per_row=False):
    w = torch.randn(out_f, in_f, generator=G)
    scale = (w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()) / FP8_MAX
    lin = Linear(in_f, out_f)
    lin.weight = torch.nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
    lin.weight_scale = scale
    lin.bias = torch.nn.Parameter(torch.randn(out_f, generator=G) * 0.1, requires_grad=False)
    return lin


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_mm_matches_its_emulation(per_row, dtype):
    """`_scaled_mm` (CPU reference here) = quantise x per tensor, dequantise both, matmul."""
    lin = _fp8_linear(per_row=per_row)
    x = torch.randn(3, 7, 48, generator=G).to(dtype)
    given = x.clone()
    got = scaled_mm_linear(x, lin.weight, lin.weight_scale, lin.bias)
    assert torch.equal(x, given)   # the activation is quantised in a copy, never in place
    x_scale = x.float().abs().amax() / FP8_MAX
    xq = (x.float() / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    emulated = F.linear(xq, dequantize(lin.weight, lin.weight_scale, torch.float32), lin.bias.float())
    assert got.dtype == dtype and got.shape == (3, 7, 32)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), emulated, rtol=tol, atol=tol * emulated.abs().max().item())
    # and it stays close to the dequantise-per-call path (activation fp8 rounding only)
    plain = F.linear(x.float(), dequantize(lin.weight, lin.weight_scale, torch.float32), lin.bias.float())
    assert (got.float() - plain).abs().max() <= 0.08 * plain.abs().max()


def test_linear_dispatch_and_fallback(monkeypatch):
    used: list = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: used.append(1) or real(*a, **kw))
    x = torch.randn(5, 48, generator=G, dtype=torch.bfloat16)
    lin = _fp8_linear()
    plain = lin(x)
    assert not used
    lin.fp8_matmul = True
    fast = lin(x)
    assert used and (fast.float() - plain.float()).abs().max() <= 0.08 * plain.float().abs().max()
    lin.lora_down = torch.randn(4, 48, generator=G).bfloat16()  # an unmerged LoRA adds on top of _scaled_mm
    lin.lora_up = torch.randn(32, 4, generator=G).bfloat16()
    torch.testing.assert_close(lin(x), fast + (x @ lin.lora_down.t()) @ lin.lora_up.t(), rtol=2e-2, atol=2e-2)
    odd = _fp8_linear(out_f=24, in_f=40)  # not multiples of 16: dequantise path, same result as without
    odd.fp8_matmul, used[:] = True, []
    x40 = x[:, :40]
    odd_out = odd(x40)
    odd.fp8_matmul = False
    assert not used and torch.equal(odd_out, odd(x40))


@pytest.mark.parametrize("mode,cap,want", [("auto", (8, 9), True), ("auto", (9, 0), True), ("auto", (8, 6), False),
                                           ("on", (8, 9), True), ("off", (9, 0), False)])
def test_fp8_matmul_decision_by_capability(monkeypatch, mode, cap, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    assert kernels._use_fp8_matmul(mode, torch.device("cuda", 0)) is want


def test_fp8_matmul_on_an_old_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert fp8_matmul_supported("cuda")[0] is False
    with pytest.raises(InputError, match=r"fp8_matmul: 'on' .*compute capability 8\.0 < 8\.9"):
        kernels._use_fp8_matmul("on", torch.device("cuda", 0))


def test_configure_dit_marks_only_e4m3_linears():
    cfg = small_config(num_layers=1)
    model = random_model(cfg, dtype=torch.bfloat16)
    q = model.blocks[0].self_attn.q
    q.weight = torch.nn.Parameter(q.weight.to(torch.float8_e4m3fn), requires_grad=False)
    assert configure_dit(model, RuntimeOptions(fp8_matmul="auto"), "cpu").fp8_matmul_layers == 0  # auto: GPUs only
    report = configure_dit(model, RuntimeOptions(fp8_matmul="on"), "cpu")
    assert report.fp8_matmul_layers == 1 and q.fp8_matmul and not model.blocks[0].self_attn.k.fp8_matmul
    configure_dit(model, RuntimeOptions(fp8_matmul="off"), "cpu")
    assert not q.fp8_matmul


# ---------------------------------------------------------------- compile
@pytest.mark.slow  # importing and running dynamo takes ~10 s on 2 cores
def test_compile_keeps_block_hooks_outside_and_the_maths():
    cfg = small_config(num_layers=1)  # every block is its own compiled frame: one keeps the test fast
    model, inputs = random_model(cfg), random_inputs(cfg, persons=1)
    want = run(model, inputs)
    seen: list[int] = []
    for i, block in enumerate(model.blocks):  # stands in for block streaming's pre-hook
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.append(i))
    graphs: list = []

    def counting_backend(gm, example_inputs):  # proves dynamo traced the blocks; runs the graph eagerly
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    report = configure_dit(model, RuntimeOptions(compile=True), "cpu", compile_backend=counting_backend)
    assert report.compiled_blocks == 1
    got = run(model, inputs)
    assert seen == [0] and graphs  # hooks ran (outside the compiled code), and graphs were compiled
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # block streaming swaps the block's tensors in its pre-hook: the compiled forward sees the real ones
    from infinitetalk.runtime.streaming import BlockStreamer

    streamer = BlockStreamer(model.blocks, [0], "cpu").install()
    got = run(model, inputs)
    assert streamer.copies >= 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert configure_dit(model, RuntimeOptions(compile=True), "cpu", compile_backend="eager").compiled_blocks == 0
    torch._dynamo.reset()
