"""The fused 2/3/4-bit MoE path on CUDA (vllm_plugin/kernels/triton/moe.py): every bit width, group size,
symmetric/asymmetric, activation dtype and a range of token counts against the fp32 torch reference (NaN-poisoned
outputs: every routed row must be written); Qwen3-VL-30B-A3B's expert shapes at decode and prefill; bit-identical
reruns; CUDA-graph capture of the op; the first-use self-check. Skipped without CUDA. On the GPU machine:
``bash scripts/gpu_check.sh``.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from vllm_plugin.kernels.triton import moe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative Frobenius error, output rounding dominates


def _problem(experts, hidden, inter, bits, group, sym, dtype, tokens, top_k, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ex = moe.random_experts(experts, hidden, inter, bits, group, dtype, gen, symmetric=sym)
    w13 = moe.repack_experts(ex["w13"], bits, hidden, dtype)
    w2 = moe.repack_experts(ex["w2"], bits, inter, dtype)
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype)
    scores = torch.randn(tokens, experts, generator=gen, device="cuda")
    weights, ids = torch.softmax(scores, dim=-1).topk(top_k, dim=-1)
    return ex, w13, w2, x, ids.to(torch.int32), weights / weights.sum(-1, keepdim=True)


def _check(y, ref, dtype):
    assert torch.isfinite(y).all(), f"{(~torch.isfinite(y)).sum().item()} non-finite outputs (unwritten rows?)"
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return err


def _poisoned(fn, shape, dtype):
    """Free a NaN block first so the op's intermediate buffers reuse it."""
    poison = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del poison
    return fn()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", [32, 128, None], ids=["g32", "g128", "perchannel"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fused_moe_matches_reference(bits, sym, group, dtype):
    # H = 512: whole W3 blocks; I = 384: ragged K for W3 (512-column blocks) and W2 (256)
    for tokens in (1, 5, 64, 300):
        ex, w13, w2, x, ids, w = _problem(8, 512, 384, bits, group, sym, dtype, tokens, 2,
                                          zlib.crc32(f"{bits}{sym}{group}{dtype}{tokens}".encode()))
        y = _poisoned(lambda: torch.ops.vlmptq.wna16_moe(x, ids, w, *w13, *w2, bits, "silu"), (tokens * 2, 768), dtype)
        _check(y, moe.reference_moe(x, ids, w, ex, bits, "silu"), dtype)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tanh_gelu_experts(bits):
    """Gemma 4's experts (gelu-tanh gated) through the same kernel: decode, a small batch, prefill."""
    for tokens in (1, 16, 300):
        ex, w13, w2, x, ids, w = _problem(8, 512, 384, bits, 64, False, torch.bfloat16, tokens, 2, 7 * bits + tokens)
        y = torch.ops.vlmptq.wna16_moe(x, ids, w, *w13, *w2, bits, "gelu_tanh")
        _check(y, moe.reference_moe(x, ids, w, ex, bits, "gelu_tanh"), torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 16, 512])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qwen3_vl_30b_a3b_expert_shapes(bits, tokens):
    """128 experts of [1536 x 2048] gate/up and [2048 x 768] down, top-8: decode, small batch, prefill."""
    ex, w13, w2, x, ids, w = _problem(128, 2048, 768, bits, 128, False, torch.bfloat16, tokens, 8, 100 * bits + tokens)
    y = torch.ops.vlmptq.wna16_moe(x, ids, w, *w13, *w2, bits, "silu")
    _check(y, moe.reference_moe(x, ids, w, ex, bits, "silu"), torch.bfloat16)
    assert torch.equal(y, torch.ops.vlmptq.wna16_moe(x, ids, w, *w13, *w2, bits, "silu")), "reruns differ"


def test_cuda_graph_capture():
    """The op captured in a CUDA graph at 4 tokens replays new inputs and routings exactly as eager runs them."""
    ex, w13, w2, x, ids, w = _problem(16, 512, 256, 3, 64, False, torch.bfloat16, 4, 4, 7)
    static = [x.clone(), ids.clone(), w.clone()]
    fn = lambda: torch.ops.vlmptq.wna16_moe(*static, *w13, *w2, 3, "silu")  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for seed in (1, 2, 3):
        _, _, _, x2, ids2, w2_ = _problem(16, 512, 256, 3, 64, False, torch.bfloat16, 4, 4, seed)
        for buf, new in zip(static, (x2, ids2, w2_)):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, torch.ops.vlmptq.wna16_moe(x2, ids2, w2_, *w13, *w2, 3, "silu"))


@pytest.mark.parametrize("tokens,top_k,experts,bm", [(5, 8, 128, 16), (128, 8, 128, 16), (128, 8, 128, 64),
                                                      (100, 6, 60, 16), (256, 4, 256, 128), (1, 2, 8, 16)])
def test_align_kernel_matches_torch(tokens, top_k, experts, bm):
    """The one-program alignment (batched decode, up to 1024 routed rows) gives align_routed's blocks."""
    gen = torch.Generator().manual_seed(tokens + experts)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32).cuda()
    launch, (rows, block_expert, nblocks) = moe.plan_align_launch(ids, experts, bm)
    launch.run()
    want_rows, want_experts, want_n = moe.align_routed(ids, experts, bm)
    n = int(want_n)
    assert int(nblocks) == n
    assert torch.equal(rows[:n * bm], want_rows[:n * bm]) and torch.equal(block_expert[:n], want_experts[:n])


@pytest.mark.parametrize("bits,group,sym", [(2, 32, False), (3, 64, False), (4, 64, True)])
def test_tiny_moe_model_through_the_fused_kernel(tmp_path, bits, group, sym):
    """A tiny Qwen3-VL-MoE whose routed experts run through the fused op with transformers' routing, against the
    same model with the dequantized experts (the CPU runs W3 g64 fp16 through the interpreter)."""
    from tests.support.kernel_model import logits_through_fused_moe
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    a, b = logits_through_fused_moe(build_tiny_qwen_vl(tmp_path, "qwen3_vl_moe"), bits, group, sym, torch.bfloat16,
                                    "cuda")
    assert torch.isfinite(b).all()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 3e-2, rel  # bf16 activations through 2 layers; the routing weights on the wrong experts: > 0.5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_self_check_passes(bits):
    from vllm_plugin.kernels.triton import selfcheck

    selfcheck._VERDICTS.clear()
    for group, dtype in ((64, torch.bfloat16), (None, torch.float16)):
        assert selfcheck.self_check(bits, group, dtype, torch.cuda.current_device(), "triton_moe") is None
