"""The fused clip search on CUDA equals the torch search, on a 7B-sized layer slice."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("bits,group,sym,m", [(3, 128, False, 7), (2, 64, False, 7), (4, 128, True, 1)])
def test_fused_search_matches_torch_on_cuda(bits, group, sym, m):
    from vlmptq.quant import WeightScheme
    from vlmptq.quant.grid import search_torch
    from vlmptq.quant.search_triton import search_params_multi_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(1024, 3584, device="cuda", generator=g) * 0.02
    imp = torch.rand(m, 3584, device="cuda", generator=g)
    scheme = WeightScheme(bits, group, sym)
    ref = search_torch(w, scheme, imp, torch.bfloat16, 100, 0.8, 2.0)
    got = search_params_multi_triton(w, scheme.maxq, sym, group, imp, torch.bfloat16, 100, 0.8, 2.0)
    for r, t in zip(ref, got):
        assert (r == t).float().mean() >= 0.999


def test_fused_search_of_mixtures_matches_torch_on_cuda():
    """VLM-PTQ's mu grid as mixtures of the vision and text rows: kernel and torch agree."""
    from vlmptq.quant import WeightScheme
    from vlmptq.quant.grid import search_torch
    from vlmptq.quant.search_triton import search_params_multi_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(1024, 3584, device="cuda", generator=g) * 0.02
    basis = torch.rand(2, 3584, device="cuda", generator=g)
    mix = torch.tensor([[mu, 1 - mu] for mu in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)], device="cuda")
    scheme = WeightScheme(3, 128, False)
    ref = search_torch(w, scheme, basis, torch.bfloat16, 100, 0.8, 2.0, mix)
    got = search_params_multi_triton(w, scheme.maxq, False, 128, basis, torch.bfloat16, 100, 0.8, 2.0, mix)
    for r, t in zip(ref, got):
        assert r.shape == t.shape == (7, 1024, 28)
        assert (r == t).float().mean() >= 0.999
