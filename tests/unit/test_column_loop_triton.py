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
    # 64; N = 72 is not a multiple of the kernel's 64 (or 32) rows. Min-max grids and one mu keep the interpreter's
    # clip searches (tested in test_search_triton.py) short
    quick = {"clip_search": False}
    # the last two cases also with the 32-row programs of GPUs that 64 would not fill (clt.rows_per_program)
    cases = [("gptq", quick, 3, 128, 64), ("gptq", quick, 2, 32, 64), ("gptaq", quick, 4, 64, 64),
             ("vlmptq", {"mu_grid": (0.5,)}, 3, 32, 64), ("vlmptq", dict(quick, modality=False), 2, 64, 64),
             ("gptaq", {}, 3, 128, 64), ("gptq", dict(quick, act_order=True), 3, 32, 64),
             ("vlmptq", {"mu_grid": (0.5,)}, 3, 32, 32), ("gptaq", quick, 4, 64, 32)]
    layers = {k: make_synthetic_layer(n=72, k=k, samples=12, seed=5) for k in (192, 256)}
    for method, opts, bits, group, block_n in cases:
        clt.BLOCK_N = block_n
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
        print(method, opts, bits, group, block_n, "identical")
    print("OK")
""")


def test_fused_column_loop_matches_the_torch_loop_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
