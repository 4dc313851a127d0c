"""Triton W2/W3/W4 kernels on CUDA: every path, bit width, group size, symmetric/asymmetric, M and
ragged shape against the torch reference; NaN-poisoned outputs (every element must be written);
bit-identical reruns (split-K reduction order is fixed); torch.compile + CUDA graph capture of the
custom op. Skipped without CUDA. On the GPU machine: ``bash scripts/gpu_check.sh``.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from vlmptq.checkpoint.packing import pack_columns, pack_rows
from vllm_plugin.kernels.base import WNA16LayerConfig
from vllm_plugin.kernels.reference import reference_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative Frobenius error, output rounding dominates


def _checkpoint(n, k, bits, group, sym, dtype, seed, bias=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), device="cuda", generator=gen)
    zeros = torch.randint(0, 2**bits, (n, k // group), device="cuda", generator=gen)
    scale = ((torch.rand(n, k // group, device="cuda", generator=gen) + 0.5) * 0.02).to(dtype)
    wp = pack_rows(codes, bits)
    zp = None if sym else pack_columns(zeros, bits)
    b = (torch.randn(n, device="cuda", generator=gen) * 0.5).to(dtype) if bias else None
    return wp, scale, zp, b, gen


def _kernel(n, k, bits, group, sym, dtype):
    from vllm_plugin.kernels.triton_wna16 import TritonWNA16Kernel

    cfg = WNA16LayerConfig(bits=bits, group_size=group, symmetric=sym, in_features=k, out_features=n,
                           act_dtype=dtype, device_type="cuda")
    ok, why = TritonWNA16Kernel.can_implement(cfg)
    assert ok, why
    return TritonWNA16Kernel(cfg)


def _poisoned_call(fn, m, n, dtype):
    """Free a NaN block of the output's size first so the op's output reuses it."""
    poison = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    del poison
    return fn()


def _check(y, ref, dtype):
    assert torch.isfinite(y).all(), f"{(~torch.isfinite(y)).sum().item()} non-finite outputs (unwritten?)"
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return err


def _run(n, k, bits, group, sym, m, dtype=torch.bfloat16, cfg=None, bias=True):
    seed = zlib.crc32(f"{n},{k},{bits},{group},{sym},{m},{dtype},{cfg}".encode())
    wp, scale, zp, b, gen = _checkpoint(n, k, bits, group, sym, dtype, seed, bias)
    kern = _kernel(n, k, bits, group, sym, dtype)
    tensors = kern.prepare(wp, scale, zp)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    if cfg is None:
        fn = lambda: kern.apply(tensors, x, b)  # noqa: E731
    else:
        from vllm_plugin.kernels.triton.ops import launch

        fn = lambda: launch(x, tensors["qweight"], tensors["sz"], b, tensors["locks"], bits, n, cfg)  # noqa: E731
    y = _poisoned_call(fn, m, n, dtype)
    torch.cuda.synchronize()
    ref = reference_linear(x.float(), wp, scale.float(), zp, bits, k, None if b is None else b.float())
    _check(y, ref, dtype)
    y2 = _poisoned_call(fn, m, n, dtype)
    assert torch.equal(y, y2), "two runs differ: a race?"
    assert (tensors["locks"] == 0).all(), "split-K counters not reset"


@pytest.mark.parametrize("m", [1, 3, 16, 64, 256])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_default_dispatch_ragged(bits, group, sym, m):
    """N = 264 and K = 1152 are ragged for every tile / layout block size (K even only for w4)."""
    _run(264, 1152, bits, group, sym, m)


@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_default_dispatch_even(bits, m):
    _run(256, 1536, bits, 128, False, m)


@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fp16(bits, m):
    _run(264, 1152, bits, 128, False, m, dtype=torch.float16)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cfg", [
    dict(path="dot", block_n=32, block_m=16, programs=7),
    dict(path="dot", block_n=64, block_m=16, num_warps=4, num_stages=4),
    dict(path="dot", block_n=128, block_m=32, num_warps=8, num_stages=2),
    dict(path="dot", block_n=128, block_m=128, num_warps=8, num_stages=1),
    dict(path="dequant", block_n=32),
], ids=["dot-streamk", "dot-deep", "dot-big", "dot-tall", "dequant"])
def test_every_path(bits, cfg):
    from vllm_plugin.kernels.triton.configs import KernelConfig

    _run(264, 1152, bits, 64, False, 5, cfg=KernelConfig(**cfg))


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_path(bits, group, sym):
    """The CUDA-core decode kernel (a launch-search candidate at M = 1): ragged N and K, K split over
    programs, both activation dtypes."""
    from vllm_plugin.kernels.triton.configs import KernelConfig

    for dtype in (torch.bfloat16, torch.float16):
        _run(264, 1152, bits, group, sym, 1, dtype=dtype, cfg=KernelConfig("gemv", block_n=64, programs=40))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_real_shape_down_proj(bits):
    """Qwen2.5-VL-7B down_proj (K = 18944: many blocks, large split-K) at decode."""
    from vllm_plugin.kernels.triton.configs import KernelConfig

    for m in (1, 16):
        _run(3584, 18944, bits, 128, False, m, bias=False)
    gemv = KernelConfig("gemv", block_n=128, num_warps=8 if bits == 3 else 4, num_stages=3)
    _run(3584, 18944, bits, 128, False, 1, bias=False, cfg=gemv)


@pytest.mark.parametrize("k", [512, 200])
def test_per_channel_scales(k):
    _run(96, k, 3, k, False, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_of_three_tiles(dtype):
    _run(96, 384, 4, 96, False, 3, dtype=dtype)


@pytest.mark.parametrize("m", [1, 16])
def test_torch_compile_and_cuda_graph(m):
    bits, group, n, k, dtype = 3, 128, 520, 2048, torch.bfloat16
    wp, scale, zp, b, gen = _checkpoint(n, k, bits, group, False, dtype, 7 + m)
    kern = _kernel(n, k, bits, group, False, dtype)
    tensors = kern.prepare(wp, scale, zp)

    def f(x):
        return kern.apply(tensors, x, b) * 2.0

    cf = torch.compile(f, fullgraph=True)
    x = torch.randn(2, m, k, device="cuda", generator=gen).to(dtype)
    ref = lambda x: reference_linear(x.float().reshape(-1, k), wp, scale.float(), zp, bits, k,  # noqa: E731
                                     b.float()).reshape(2, m, n) * 2.0
    _check(cf(x), ref(x), dtype)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            cf(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = cf(static_x)
    for _ in range(3):  # new data through the captured graph
        new = torch.randn(2, m, k, device="cuda", generator=gen).to(dtype)
        static_x.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        _check(static_y, ref(new), dtype)
    assert (tensors["locks"] == 0).all()


def test_fake_impl_shapes():
    import vllm_plugin.kernels.triton.ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.bfloat16, device="cuda")
        q = torch.empty(1, 8, 32, dtype=torch.int32, device="cuda")
        sz = torch.empty(2, 8, dtype=torch.int32, device="cuda")
        locks = torch.empty(16, dtype=torch.int32, device="cuda")
        y = torch.ops.vlmptq.wna16_gemm(x, q, sz, None, locks, 4, 8)
        assert y.shape == (5, 8) and y.dtype == torch.bfloat16


def test_can_implement_reasons():
    from vllm_plugin.kernels.triton_wna16 import TritonWNA16Kernel

    bad = WNA16LayerConfig(bits=8, group_size=24, symmetric=False, in_features=96, out_features=8,
                           act_dtype=torch.float32, device_type="cuda")
    ok, why = TritonWNA16Kernel.can_implement(bad)
    assert not ok and "8-bit" in why and "float32" in why and "multiple of 32" in why


@pytest.mark.parametrize("bits,group,dtype", [(2, 128, torch.bfloat16), (3, 64, torch.float16),
                                               (4, 32, torch.bfloat16), (3, None, torch.bfloat16)])
def test_self_check_passes_and_gates_can_implement(bits, group, dtype):
    """The first-use check the plugin runs before serving (every launch path, stream-K sums)."""
    from vllm_plugin.kernels.triton import selfcheck
    from vllm_plugin.kernels.triton_wna16 import TritonWNA16Kernel

    assert selfcheck.self_check(bits, group, dtype, "cuda") is None
    k = 3584
    cfg = WNA16LayerConfig(bits=bits, group_size=group or k, symmetric=False, in_features=k, out_features=512,
                           act_dtype=dtype, device_type="cuda")
    assert TritonWNA16Kernel.can_implement(cfg) == (True, None)
