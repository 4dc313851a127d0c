"""How the solvers rank on synthetic layers with realistic structure (vlmptq.solvers.synthetic),
over several seeds per bit width. Orderings that held on every seed of the 20-seed study
(benchmarks/results/solver-orderings.md) are asserted per seed; those that held only on average are
asserted on the mean. Orderings the study found NOT to hold are documented in docs/algorithm.md and
not asserted (e.g. GPTAQ at alpha=1 is worse than GPTQ at W2 with per-group dynamic grids, and the
paper's diagonal correction changes the loss by less than 1% either way at alpha=0.25).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from vlmptq.quant import WeightScheme
from vlmptq.solvers import SolverOptions, build_solver
from vlmptq.solvers.synthetic import make_synthetic_layer

SEEDS = range(8)
O = SolverOptions
CONFIGS = {
    "rtn": ("rtn", O()),
    "gptq": ("gptq", O()),
    "gptaq1": ("gptaq", O(alpha=1.0)),
    "C.25": ("vlmptq", O(alpha=0.25, correction="diag", modality=False)),
    "exact.25": ("vlmptq", O(alpha=0.25, correction="exact", modality=False)),
    "M.25": ("vlmptq", O(alpha=0.25, correction="none")),
    "MC.25": ("vlmptq", O(alpha=0.25, correction="diag")),
    "Mexact.25": ("vlmptq", O(alpha=0.25, correction="exact")),
    "Mtarget1": ("vlmptq", O(alpha=1.0, correction="target")),
}


@pytest.fixture(scope="module")
def study():
    """{bits: {config: [(loss_sym, loss_asym, info) per seed]}}"""
    torch.set_num_threads(1)
    out: dict[int, dict[str, list]] = {}
    for bits in (2, 3, 4):
        out[bits] = {name: [] for name in CONFIGS}
        for seed in SEEDS:
            layer = make_synthetic_layer(n=64, k=128, samples=12, vision_tokens=64, text_tokens=24, seed=seed)
            stats = layer.statistics()
            scheme = WeightScheme(bits, 32, False)
            for name, (method, opts) in CONFIGS.items():
                res = build_solver(method, opts).solve(layer.weight, stats, scheme, torch.float32)
                q = res.qweight.dequantize(torch.float32)
                out[bits][name].append((layer.loss_sym(q), layer.loss_asym(q), res.info))
    return out


def _col(study, bits, name, idx):
    return [r[idx] for r in study[bits][name]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_its_own_objective_every_seed(study, bits):
    for rtn, gptq in zip(_col(study, bits, "rtn", 0), _col(study, bits, "gptq", 0)):
        assert gptq <= rtn


def test_derived_gptaq_update_beats_gptq_on_the_asymmetric_objective(study):
    # W4: every seed; W3: on average (the 20-seed study's worst W3 seed was 1.12x GPTQ).
    for gptq, gptaq in zip(_col(study, 4, "gptq", 1), _col(study, 4, "gptaq1", 1)):
        assert gptaq <= gptq
    assert statistics.mean(_col(study, 3, "gptaq1", 1)) <= statistics.mean(_col(study, 3, "gptq", 1))


@pytest.mark.parametrize("bits", [3, 4])  # at W2 the two are within a few percent either way
def test_exact_shift_beats_diagonal_correction_on_average(study, bits):
    for exact, diag in (("exact.25", "C.25"), ("Mexact.25", "MC.25")):
        ratio = [e / d for e, d in zip(_col(study, bits, exact, 1), _col(study, bits, diag, 1))]
        assert statistics.mean(ratio) <= 1.0, (exact, diag, ratio)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_modality_aware_grid_beats_gptaq_grids_every_seed(study, bits):
    for m, gptq in zip(_col(study, bits, "M.25", 1), _col(study, bits, "gptq", 1)):
        assert m <= gptq


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_searched_mu_is_at_least_as_good_as_mu_half_on_the_scored_loss(study, bits):
    for info in _col(study, bits, "M.25", 2):
        assert info["mu_scores"][info["mu"]] <= info["mu_scores"][0.5]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_least_squares_target_is_the_best_variant_on_average(study, bits):
    target = statistics.mean(_col(study, bits, "Mtarget1", 1))
    for other in ("gptq", "gptaq1", "MC.25", "Mexact.25"):
        assert target <= statistics.mean(_col(study, bits, other, 1)), other
