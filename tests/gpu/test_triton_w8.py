"""Triton W8 kernel (vllm_plugin.kernels.triton_w8) on CUDA: group sizes (incl. the per-column scale
lookup of g96), per-channel, symmetric/asymmetric, M from decode to prefill, ragged N, against the
torch reference; NaN-poisoned outputs; bit-identical reruns (split-K partials summed in a fixed
order); the first-use self-check; CUDA graph capture of the custom op. Skipped without CUDA."""

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

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _layer(n, k, group, sym, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), device="cuda", generator=gen)
    zeros = torch.randint(0, 256, (n, k // group), device="cuda", generator=gen)
    scale = ((torch.rand(n, k // group, device="cuda", generator=gen) + 0.5) * 2e-4).to(dtype)
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.5).to(dtype)
    return pack_rows(codes, 8), scale, None if sym else pack_columns(zeros, 8), bias, gen


@pytest.mark.parametrize("m", [1, 3, 16, 48, 64, 65, 256])
@pytest.mark.parametrize("group,sym,dtype", [(128, False, torch.bfloat16), (32, False, torch.float16),
                                             (64, True, torch.bfloat16), (96, False, torch.bfloat16),
                                             (None, False, torch.bfloat16)])
def test_w8_matches_reference(m, group, sym, dtype):
    from vllm_plugin.kernels.triton_w8 import TritonW8A16Kernel

    n, k = 1000, (1152 if group == 96 else 1024)
    g = group or k
    wp, scale, zp, bias, gen = _layer(n, k, g, sym, dtype, zlib.crc32(f"{m},{group},{sym},{dtype}".encode()))
    cfg = WNA16LayerConfig(8, g, sym, k, n, dtype, "cuda")
    ok, why = TritonW8A16Kernel.can_implement(cfg)
    assert ok, why
    kern = TritonW8A16Kernel(cfg)
    tensors = kern.prepare(wp, scale, zp)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)

    def call():
        poison = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        del poison
        return kern.apply(tensors, x, bias)

    y = call()
    ref = reference_linear(x.float(), wp, scale.float(), zp, 8, k, bias.float())
    assert torch.isfinite(y).all(), "non-finite outputs (unwritten?)"
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    assert torch.equal(y, call()), "two runs differ"


@pytest.mark.parametrize("group,dtype", [(128, torch.bfloat16), (None, torch.float16), (32, torch.bfloat16)])
def test_w8_self_check_passes(group, dtype):
    from vllm_plugin.kernels.triton import selfcheck

    assert selfcheck.self_check(8, group, dtype, "cuda", "triton_w8") is None


def test_w8_op_in_a_cuda_graph():
    n, k, m = 512, 1024, 4
    wp, scale, zp, bias, gen = _layer(n, k, 128, False, torch.bfloat16, 7)
    from vllm_plugin.kernels.triton_w8 import prepare_w8

    t = prepare_w8(wp, scale, zp, k, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    eager = torch.ops.vlmptq.w8_gemm(x, t["qweight"], t["scale"], t["zero"], bias)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.vlmptq.w8_gemm(x, t["qweight"], t["scale"], t["zero"], bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
