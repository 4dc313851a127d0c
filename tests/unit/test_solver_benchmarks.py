"""The solver benchmarks' own machinery: the profile's phase table finds every named range of a real solve,
and the TF32 emulation of benchmarks/solver_tf32.py rounds what it should and reaches every user of
``tf32_products`` (a renamed range or a new caller would otherwise make their tables silently wrong)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from solver_tf32 import EmulatedTF32, emulated_tf32_products, to_tf32  # noqa: E402
from solvers import phase_table  # noqa: E402

from vlmptq.quant import WeightScheme  # noqa: E402
from vlmptq.solvers import SolverOptions, build_solver  # noqa: E402
from vlmptq.solvers.synthetic import make_synthetic_layer  # noqa: E402


def test_phase_table_lists_every_range_of_a_vlmptq_solve():
    from torch.profiler import ProfilerActivity, profile

    layer = make_synthetic_layer(n=32, k=256, samples=6, seed=0)
    solver = build_solver("vlmptq", SolverOptions(mu_grid=(0.0, 1.0)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        solver.solve(layer.weight, layer.statistics(), WeightScheme(3, 128, False), torch.bfloat16)
    table = phase_table(prof.key_averages())
    for name in ("factor", "clip_search", "mu_scores", "gptq_column_loop", "asym_rows", "lazy_update"):
        assert f"| vlmptq::{name} |" in table, table


def test_tf32_rounding_keeps_ten_mantissa_bits_nearest_even():
    x = torch.tensor([1.0 + 2.0**-10, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-12), 3.0e-3])
    y = to_tf32(x)
    assert y[0] == x[0]  # representable: unchanged
    assert y[1] == 1.0  # a tie rounds to the even mantissa
    assert y[2] == 1.0 + 2 * 2.0**-10  # a tie rounds up to the even one
    assert y[3] == -1.0
    assert abs(y[4] / x[4] - 1) <= 2.0**-11


def test_tf32_emulation_reaches_the_solvers_products():
    a, b = torch.full((4, 4), 1.0 + 2.0**-12), torch.eye(4)
    with EmulatedTF32():
        assert torch.equal(a @ b, torch.ones(4, 4))  # the factor was rounded before the product
    from vlmptq.solvers import gptq, modality, precision

    with emulated_tf32_products():
        assert gptq.tf32_products is not precision.tf32_products
        assert modality.tf32_products is not precision.tf32_products
        with gptq.tf32_products(torch.device("cpu")):
            assert torch.equal(a @ b, torch.ones(4, 4))
    assert gptq.tf32_products is precision.tf32_products  # restored
