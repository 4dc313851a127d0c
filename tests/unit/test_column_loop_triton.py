"""The fused column loop (one Triton launch per group segment of a block; what CUDA runs) equals the torch
loop (what the CPU runs), through the Triton interpreter: the same operations in the same order. Only
fused multiply-adds (torch's vectorized CPU kernels may use them) move the errors in their last bits, so on
these seeded layers codes, scales and zero points must be identical and the proxy loss agree to 1e-5. On a
GPU such a difference can move a value across a code boundary; tests/gpu/test_solvers_cuda.py runs the
compiled kernel against the CPU with that tolerance."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    import torch
    from vlmptq.quant import WeightScheme
    from vlmptq.solvers import SolverOptions, build_solver
    from vlmptq.solvers import column_loop_triton as clt
    from vlmptq.solvers.synthetic import make_synthetic_layer

    assert clt.enabled(torch.device("cpu"))
    # (method, options, bits, group): dynamic grids (GPTQ / GPTAQ, and VLM-PTQ without modality), static
    # (VLM-PTQ), groups inside a block; K = 192 leaves a ragged last block (64 of 128 columns) for groups 32 /
    # 64; N = 72 is not a multiple of the kernel's 64 rows. Min-max grids and one mu keep the interpreter's
    # clip searches (tested in test_search_triton.py) short
    quick = {"clip_search": False}
    cases = [("gptq", quick, 3, 128), ("gptq", quick, 2, 32), ("gptaq", quick, 4, 64),
             ("vlmptq", {"mu_grid": (0.5,)}, 3, 32), ("vlmptq", dict(quick, modality=False), 2, 64),
             ("gptaq", {}, 3, 128), ("gptq", dict(quick, act_order=True), 3, 32)]
    layers = {k: make_synthetic_layer(n=72, k=k, samples=12, seed=5) for k in (192, 256)}
    for method, opts, bits, group in cases:
        layer = layers[256 if group == 128 else 192]
        stats = layer.statistics()
        scheme = WeightScheme(bits, group, False)
        solver = build_solver(method, SolverOptions(**opts))
        os.environ[clt.FUSED_ENV] = "0"
        torch_res = solver.solve(layer.weight, stats, scheme, torch.bfloat16)
        os.environ[clt.FUSED_ENV] = "1"
        fused_res = solver.solve(layer.weight, stats, scheme, torch.bfloat16)
        a, b = torch_res.qweight, fused_res.qweight
        same = (a.codes == b.codes).float().mean().item()
        assert same == 1.0, (method, opts, bits, group, same)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), (method, opts, group)
        pa, pb = torch_res.info["proxy_loss"], fused_res.info["proxy_loss"]
        assert abs(pa - pb) <= 1e-5 * abs(pa), (method, opts, group, pa, pb)
        print(method, opts, bits, group, "identical")
    print("OK")
""")


def test_fused_column_loop_matches_the_torch_loop_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


COMPILE = textwrap.dedent("""
    import torch
    from vllm_plugin.kernels.triton import aot
    from vlmptq.solvers.column_loop_triton import BLOCK_N, _segment_kernel
    meta = dict(device="meta", dtype=torch.float32)
    nb, n = 128, 3584
    for asym, diag in ((False, False), (True, False), (True, True)):  # GPTQ, GPTAQ, VLM-PTQ
        coef = torch.empty(nb, nb, 2, **meta) if asym else torch.empty(nb, nb, **meta)
        s = torch.empty(n, **meta)
        with aot._compile_only(aot.H100_ARCH):
            c = _segment_kernel.warmup(torch.empty(nb, 2, n, **meta), torch.empty(nb, n, **meta), coef, s, s,
                                       torch.empty(nb, n, **meta), n, nb, 0, nb, 7.0, B=128, BLOCK_N=BLOCK_N,
                                       ASYM=asym, DIAG=diag, num_warps=4, grid=(n // BLOCK_N,))
        use = aot.resource_usage(c)
        assert not use.spills, (asym, diag, use.registers)
    print("OK")
""")


def test_segment_kernel_compiles_for_sm90_without_spills():
    """What the interpreter cannot see: the kernel lowers for an H100/H200 (the GPU image's Triton too, when
    scripts/setup_sidecars.sh installed it) and keeps its register tile without spilling."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    sidecar = Path(sys.prefix) / "triton-gpu"
    for extra in [None] + ([sidecar] if (sidecar / "triton" / "__init__.py").is_file() else []):
        path = os.pathsep.join(str(p) for p in (extra, repo) if p is not None)
        env = dict(os.environ, PYTHONPATH=path, TRITON_DEFAULT_FP_FUSION="1")
        env.pop("TRITON_INTERPRET", None)
        out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600,
                             cwd=repo)
        assert out.returncode == 0 and "OK" in out.stdout, f"{extra}: " + out.stdout[-2000:] + out.stderr[-4000:]
