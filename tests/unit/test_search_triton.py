"""The fused Triton clip search equals the torch search (run through the Triton interpreter here;
tests/gpu/test_search_triton.py runs the compiled kernel on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch
    from vlmptq.quant import WeightScheme
    from vlmptq.quant.grid import search_torch
    from vlmptq.quant.search_triton import can_run, search_params_multi_triton
    torch.manual_seed(0)
    # (bits, group, symmetric, weightings, scale dtype, shrink grid); one case with the full grid
    cases = [(3, 32, False, 7, torch.bfloat16, 100), (4, 64, True, 1, torch.bfloat16, 25),
             (2, 128, False, 3, torch.float32, 25), (4, 32, False, 2, torch.float16, 25),
             (8, 32, False, 1, torch.bfloat16, 25)]
    for bits, g, sym, m, sd, grid in cases:
        w = torch.randn(9, 256) * 0.02
        w[0, :g] = 0  # an all-zero group
        w[3, 5] = 0.5  # an outlier
        imp = torch.rand(m, 256)
        scheme = WeightScheme(bits, g, sym)
        assert can_run(w, g, m, sd)[0], can_run(w, g, m, sd)
        ref = search_torch(w, scheme, imp, sd, grid, 0.8, 2.0)
        got = search_params_multi_triton(w, scheme.maxq, sym, g, imp, sd, grid, 0.8, 2.0)
        for r, t in zip(ref, got):
            assert r.shape == t.shape
            assert (r == t).float().mean() >= 0.99, (bits, g, sym, m, sd, (r != t).sum())
    print("OK")
""")


def test_fused_search_matches_torch_search_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
