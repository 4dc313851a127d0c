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
    # mixtures of a basis (VLM-PTQ's mu grid over the vision and text rows): the kernel equals the torch
    # search with the same mix, and both equal the search over the mixed importances themselves up to ties
    basis = torch.rand(2, 256)
    mix = torch.tensor([[mu, 1 - mu] for mu in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)])
    for bits, g in ((3, 128), (2, 64)):
        w = torch.randn(17, 256) * 0.02
        scheme = WeightScheme(bits, g, False)
        ref = search_torch(w, scheme, basis, torch.bfloat16, 100, 0.8, 2.0, mix)
        got = search_params_multi_triton(w, scheme.maxq, False, g, basis, torch.bfloat16, 100, 0.8, 2.0, mix)
        direct = search_torch(w, scheme, mix @ basis, torch.bfloat16, 100, 0.8, 2.0)
        for r, t, d in zip(ref, got, direct):
            assert r.shape == t.shape == d.shape == (7, 17, 256 // g)
            assert (r == t).float().mean() >= 0.99, (bits, g, (r != t).sum())
            assert (r == d).float().mean() >= 0.99, (bits, g, (r != d).sum())
        one = search_params_multi_triton(w, scheme.maxq, False, g, basis, torch.bfloat16, 100, 0.8, 2.0, mix[3:4])
        assert torch.equal(one[0][0], got[0][3]) and torch.equal(one[1][0], got[1][3])  # a weighting alone: same
    print("OK")
""")


def test_fused_search_matches_torch_search_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
