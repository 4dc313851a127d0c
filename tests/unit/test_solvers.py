"""The solvers: exact reductions, agreement with an unblocked reference, closed forms, bad inputs."""

from __future__ import annotations

import pytest
import torch

from vlmptq.errors import ConfigError, SolverError
from vlmptq.quant import WeightScheme
from vlmptq.quant.grid import expand_groups, fake_quantize, minmax_params, quantize_codes
from vlmptq.solvers import SolverOptions, build_solver, gptq_quantize, layer_loss
from vlmptq.solvers.modality import choose_modality_params
from vlmptq.solvers.synthetic import make_synthetic_layer
from vlmptq.stats import StatisticsAccumulator


@pytest.fixture(scope="module")
def layer():
    return make_synthetic_layer(n=48, k=128, samples=8, seed=3)


@pytest.fixture(scope="module")
def stats(layer):
    return layer.statistics()


def _solve(method, layer, stats, scheme, **opts):
    return build_solver(method, SolverOptions(**opts)).solve(layer.weight, stats, scheme, torch.bfloat16).qweight


def _same(a, b):
    return torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("bits,group,sym", [(2, 32, False), (3, 64, False), (4, 32, True), (4, -1, False)])
def test_extensions_switched_off_reproduce_gptq_bit_for_bit(layer, stats, bits, group, sym):
    scheme = WeightScheme(bits, group, sym)
    gptq = _solve("gptq", layer, stats, scheme)
    assert _same(_solve("gptaq", layer, stats, scheme, alpha=0.0), gptq)
    assert _same(_solve("vlmptq", layer, stats, scheme, alpha=0.0, modality=False), gptq)
    # With only the asymmetric term on, VLM-PTQ is GPTAQ.
    gptaq = _solve("gptaq", layer, stats, scheme, alpha=0.25)
    assert _same(_solve("vlmptq", layer, stats, scheme, alpha=0.25, correction="none", modality=False), gptaq)
    assert not _same(gptaq, gptq)  # the asymmetric term does change the result


def _naive_reference(w, h, d, scheme, scale, zero, alpha, correction, damp=0.01):
    """SPEC §2 written out column by column, no blocking, float64: the oracle for the blocked loop."""
    w, h, d = w.double().clone(), h.double().clone(), d.double()
    k = w.shape[1]
    glen = scheme.group_len(k)
    h[range(k), range(k)] += damp * h.diag().mean()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    a = alpha * d @ u.t()
    p = torch.triu(a, 1) @ u
    codes = torch.zeros_like(w)
    for j in range(k):
        s, z = scale[:, j // glen].double(), zero[:, j // glen].double()
        col = w[:, j].clone()
        if correction == "diag":
            target = col * (1 + a[j, j] * u[j, j])
        elif correction == "exact":
            target = col + u[j, j] * (w[:, j:] @ a[j:, j])
        else:
            target = col
        codes[:, j] = quantize_codes(target, s, z, scheme.maxq)
        err = (col - (codes[:, j] - z) * s) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:]) - torch.outer(col, p[j, j:])
    return codes


@pytest.mark.parametrize("correction", ["none", "diag", "exact"])
@pytest.mark.parametrize("block_size", [16, 128])
def test_blocked_loop_matches_unblocked_reference(layer, stats, correction, block_size):
    scheme = WeightScheme(4, 32, False)
    w = layer.weight.double()
    scale, zero = minmax_params(w, scheme, torch.float64)
    ref = _naive_reference(w, stats.hessian, stats.dxxt, scheme, scale, zero, 0.5, correction)
    got = gptq_quantize(
        w, stats.hessian.double(), scheme, dxxt=stats.dxxt.double(), alpha=0.5, correction=correction,
        static_params=(scale, zero), block_size=block_size, scale_dtype=torch.float64,
    )
    mismatches = (got.qweight.codes.double() != ref).sum().item()
    assert mismatches == 0


def test_target_correction_is_gptq_on_the_least_squares_target(layer, stats):
    scheme = WeightScheme(3, 32, False)
    w = layer.weight.double()
    h = stats.hessian.double().clone()
    k = h.shape[0]
    h_d = h.clone()
    h_d[range(k), range(k)] += 0.01 * h.diag().mean()
    target = w + w @ stats.dxxt.double() @ torch.linalg.inv(h_d)
    params = minmax_params(w, scheme, torch.float64)
    got = gptq_quantize(w, h, scheme, dxxt=stats.dxxt.double(), alpha=1.0, correction="target",
                        static_params=params, scale_dtype=torch.float64)
    ref = gptq_quantize(target, h, scheme, static_params=params, scale_dtype=torch.float64)
    assert (got.qweight.codes != ref.qweight.codes).float().mean() < 1e-3


def test_closed_form_loss_equals_explicit_layer_loss(layer, stats):
    scheme = WeightScheme(3, 32, False)
    q = _solve("rtn", layer, stats, scheme).dequantize(torch.float32)
    n = stats.n_samples
    w = layer.weight.double()
    constant = sum(((xf.double() - x.double()) @ w.t()).square().sum().item() for x, xf in zip(layer.x, layer.x_fp))
    closed = layer_loss(layer.weight.double(), q.double(), stats.hessian.double(), stats.dxxt.double()).item()
    explicit = layer.loss_asym(q)
    assert closed * n / 2 + constant == pytest.approx(explicit, rel=1e-4)
    sym = layer_loss(layer.weight.double(), q.double(), stats.hessian.double()).item()
    assert sym * n / 2 == pytest.approx(layer.loss_sym(q), rel=1e-4)



def test_mu_scores_are_the_closed_form_loss_of_each_candidate(layer, stats):
    """The mu search scores each candidate grid with a shared ``W dXXT`` (one matmul per mu): the
    scores must still be exactly ``layer_loss`` of rounding with that mu's parameters."""
    scheme = WeightScheme(3, 32, False)
    dv, dt = stats.modality_diagonals("mean")
    grid = (0.0, 0.5, 1.0)
    w = layer.weight.float()
    choice = choose_modality_params(w, stats.hessian, stats.dxxt, dv, dt, scheme, grid, score_rows=None)
    for mu in grid:
        one = choose_modality_params(w, stats.hessian, stats.dxxt, dv, dt, scheme, (mu,), score_rows=None)
        q = fake_quantize(w, expand_groups(one.scale, 32), expand_groups(one.zero, 32), scheme.maxq)
        assert choice.scores[mu] == pytest.approx(layer_loss(w, q, stats.hessian, stats.dxxt).item(), rel=1e-4)


def test_mu_search_on_a_row_subset_equals_the_all_rows_search(layer, stats):
    """With more rows than ``score_rows`` only the scored rows are searched for every mu, then the chosen
    mu over all rows: bit for bit what searching every mu over all rows and keeping the best gives."""
    from vlmptq.quant.grid import search_params_multi
    from vlmptq.solvers.modality import importance_basis

    scheme = WeightScheme(3, 32, False)
    dv, dt = stats.modality_diagonals("mean")
    grid = (0.0, 0.4, 0.5, 1.0)
    w = layer.weight.float()
    n = w.shape[0]
    choice = choose_modality_params(w, stats.hessian, stats.dxxt, dv, dt, scheme, grid, score_rows=n // 4)
    mix = torch.tensor([[mu, 1 - mu] for mu in grid])
    all_scales, all_zeros = search_params_multi(w, scheme, importance_basis(dv, dt), torch.bfloat16, mix=mix)
    best = grid.index(choice.mu)
    assert torch.equal(choice.scale, all_scales[best]) and torch.equal(choice.zero, all_zeros[best])
    rows = slice(0, n, -(-n // (n // 4)))
    for i, mu in enumerate(grid):  # every score is that mu's loss on the scored rows
        q = fake_quantize(w[rows], expand_groups(all_scales[i][rows], 32), expand_groups(all_zeros[i][rows], 32),
                          scheme.maxq)
        assert choice.scores[mu] == pytest.approx(
            layer_loss(w[rows], q, stats.hessian, stats.dxxt).item(), rel=1e-5)
    assert choice.mu == min(choice.scores, key=choice.scores.get)


def test_tf32_products_is_scoped_to_cuda_and_restores_the_setting():
    from vlmptq.solvers.precision import tf32_products

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_products(torch.device("cpu")):
        assert matmul.fp32_precision == before  # nothing changes for CPU tensors
    with tf32_products(torch.device("cuda")):  # only flips the flag: runs without a GPU
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), tf32_products(torch.device("cuda")):
        raise RuntimeError("solver failed")
    assert matmul.fp32_precision == before

def test_statistics_match_direct_sums(layer):
    st = layer.statistics()
    n = len(layer.x)
    h = sum(x.double().t() @ x.double() for x in layer.x) * 2 / n
    d = sum((xf.double() - x.double()).t() @ x.double() for x, xf in zip(layer.x, layer.x_fp)) * 2 / n
    torch.testing.assert_close(st.hessian.double(), h, rtol=1e-4, atol=1e-4 * h.abs().max().item())
    torch.testing.assert_close(st.dxxt.double(), d, rtol=1e-4, atol=1e-4 * d.abs().max().item())
    dv_sum, dt_sum = st.modality_diagonals("sum")
    torch.testing.assert_close((dv_sum + dt_sum).double(), h.diag(), rtol=1e-4, atol=1e-6)
    dv, dt = st.modality_diagonals("mean")
    nv = sum(int(m.sum()) for m in layer.vision_mask)
    vis = torch.cat([x[m] for x, m in zip(layer.x, layer.vision_mask)]).double()
    torch.testing.assert_close(dv.double(), vis.square().sum(0) / nv, rtol=1e-5, atol=1e-7)


def test_act_order_returns_codes_in_original_column_order(layer, stats):
    scheme = WeightScheme(4, 32, False)
    plain = _solve("gptq", layer, stats, scheme)
    ordered = _solve("gptq", layer, stats, scheme, act_order=True)
    w = layer.weight
    err_plain = layer.loss_sym(plain.dequantize(torch.float32))
    err_ordered = layer.loss_sym(ordered.dequantize(torch.float32))
    assert err_ordered < 2 * err_plain  # same order of magnitude: columns were not scrambled
    rtn = layer.loss_sym(_solve("rtn", layer, stats, scheme).dequantize(torch.float32))
    assert err_ordered < rtn
    assert ordered.codes.shape == w.shape


def test_modality_choice_is_recorded(layer, stats):
    res = build_solver("vlmptq", SolverOptions()).solve(layer.weight, stats, WeightScheme(3, 32, False), torch.bfloat16)
    assert res.info["mu"] in res.info["mu_scores"]
    assert res.info["mu_scores"][res.info["mu"]] == min(res.info["mu_scores"].values())


# ------------------------------------------------------------------ bad inputs
def test_nonfinite_weight_or_statistics_are_rejected(layer, stats):
    scheme = WeightScheme(4, 32, False)
    w = layer.weight.clone()
    w[0, 0] = float("nan")
    with pytest.raises(SolverError, match="weight contains 1 NaN/Inf"):
        gptq_quantize(w, stats.hessian, scheme)
    h = stats.hessian.clone()
    h[1, 2] = float("inf")
    with pytest.raises(SolverError, match="hessian contains"):
        gptq_quantize(layer.weight, h, scheme)
    acc = StatisticsAccumulator(128, "cpu", fp_inputs=False, modality=False)
    with pytest.raises(SolverError, match="NaN/Inf"):
        acc.add(torch.full((3, 128), float("nan")))


def test_shape_mismatches_are_rejected(layer, stats):
    scheme = WeightScheme(4, 32, False)
    with pytest.raises(SolverError, match=r"hessian must be \[64, 64\]"):
        gptq_quantize(layer.weight[:, :64], stats.hessian, scheme)
    with pytest.raises(SolverError, match="dxxt must be"):
        gptq_quantize(layer.weight, stats.hessian, scheme, dxxt=stats.dxxt[:10], alpha=0.25)
    acc = StatisticsAccumulator(128, "cpu", fp_inputs=True, modality=False)
    with pytest.raises(SolverError, match="layer expects 128"):
        acc.add(torch.zeros(3, 96))


def test_group_size_and_bits_are_validated(layer, stats):
    with pytest.raises(ConfigError, match="not divisible by group_size=128"):
        gptq_quantize(layer.weight[:, :96], stats.hessian[:96, :96], WeightScheme(4, 128, False))
    with pytest.raises(ConfigError, match="bits=5 is not supported"):
        WeightScheme(5, 128, False)
    with pytest.raises(ConfigError, match="group_size=48"):
        WeightScheme(4, 48, False)


def test_hessian_that_will_not_factor_gets_a_clear_error(layer):
    h = -torch.eye(128)
    with pytest.raises(SolverError, match="does not factor even with damping"):
        gptq_quantize(layer.weight, h, WeightScheme(4, 32, False))


def test_rank_deficient_hessian_is_rescued_by_damping_with_a_warning(layer, caplog):
    x = torch.randn(16, 128, dtype=torch.float64)
    h = (x.t() @ x).float() * 1e-3
    h[:, 5] = h[5, :] = 0  # a dead column as well
    with caplog.at_level("WARNING"):
        res = gptq_quantize(layer.weight, h, WeightScheme(4, 32, False), damp=0.0)
    assert "not positive definite" in caplog.text
    assert torch.isfinite(res.qweight.scale.float()).all()
    assert res.info["damp"] > 0


def test_options_that_do_not_apply_are_rejected():
    with pytest.raises(ConfigError, match="do not apply to method 'gptq'"):
        build_solver("gptq", SolverOptions(correction="exact"))
    with pytest.raises(ConfigError, match="unknown method"):
        build_solver("awq")
    with pytest.raises(ConfigError, match="needs alpha > 0"):
        build_solver("vlmptq", SolverOptions(alpha=0.0, correction="diag"))
    with pytest.raises(ValueError, match="mu_grid"):
        SolverOptions(mu_grid=(0.5, 1.5))
