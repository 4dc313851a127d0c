"""The GPTQ column loop, with GPTAQ's asymmetric update and VLM-PTQ's correction term as options.

One pure function, :func:`gptq_quantize`. Notation (SPEC §2), for ``W [N, K]`` (rows = outputs):
    H     [K, K]  input Hessian, dampened by ``damp * mean(diag H)``
    U     [K, K]  upper Cholesky factor of ``H^-1``  (``H^-1 = U^T U``)
    dXXT  [K, K]  asymmetric cross term ``2/N sum dX X^T``; enters scaled by ``alpha``
    A     = alpha * dXXT @ U^T,  P = triu(A, 1) @ U   (GPTAQ; P is strictly upper triangular)
Column ``j`` (left to right, in blocks of ``block_size`` with lazy updates of later blocks):
    target_j = w_j                                   correction="none"  (GPTQ / GPTAQ)
             = w_j * (1 + A_jj U_jj)                 correction="diag"  (VLM-PTQ, the paper)
             = w_j + U_jj * sum_{i>=j} w_i A_ij      correction="exact" (all remaining columns)
``correction="target"`` instead runs plain GPTQ on the least-squares target
``T = W + alpha * W dXXT H^-1``: since ``T X`` is the projection of ``W X~`` onto the row space of
``X``, ``||W X~ - Q X||^2 = ||(T - Q) X||^2 + const``, so at ``alpha = 1`` this is GPTQ on the
asymmetric objective exactly (no P term; beyond the paper, see docs/algorithm.md).
    q_j  = quant(target_j),  err_j = (w_j - q_j) / U_jj
    W[:, j:] -= err_j U[j, j:] - w_j P[j, j:]
``w_j`` is the column's current (error-compensated) value just before it is quantized. The lazy
block update uses those same pre-quantization values, so blocked and unblocked runs agree (the
GPTAQ reference code uses the quantized block there instead; see docs/algorithm.md).
With ``dxxt=None`` or ``alpha=0`` the asymmetric terms are skipped and the loop is GPTQ exactly.

A and P are never formed whole: block ``[i1, i2)`` needs only the rows ``A[i1:i2, i1:]`` and
``P[i1:i2, i1:]`` (and, for the exact shift, the column block ``A[i1:, i1:i2]``), and since ``U`` is
upper triangular those depend only on the trailing ``[i1:, i1:]`` corners of dXXT and U
(:func:`_asym_rows`). That costs ``4 K^3 / 3`` flops instead of ``4 K^3`` (less again: column chunks
skip the zeros inside each corner) and keeps ``O(block K)`` memory instead of two ``K x K`` matrices
(for a 7B down_proj, ``K = 18944``: 2.9 GB of fp32). On CUDA these products, and the P term's share of the lazy block updates, run in TF32
(:mod:`vlmptq.solvers.precision`); the updates GPTQ itself makes stay fp32.

On CUDA a block's columns run as one Triton launch per group segment (:mod:`.column_loop_triton`; the
torch loop below is bound there by the host's per-call overhead, not by the device), except with the
exact shift. The torch loop (the CPU's, and the reference the fused one is tested
against) costs the same 6 kernels per column in every method: ``t = zero + target / scale`` (one fused op; the diagonal
correction folds ``1 + C_j`` into a per-group ``(1 + C_j) / scale``), clamp, round (codes are
``round(clamp(t, 0, maxq))``, which equals ``clamp(round(target / scale) + zero)`` up to .5 ties),
``w_j - q_j``, and one update of the block's later columns: ``addr`` for GPTQ, a ``k = 2`` matmul
over the interleaved (value, error) rows for GPTAQ. The exact shift adds two.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from vlmptq.errors import SolverError
from vlmptq.quant.grid import minmax_params, search_params
from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers import column_loop_triton
from vlmptq.solvers.precision import tf32_products

logger = logging.getLogger(__name__)

Correction = Literal["none", "diag", "exact", "target"]
COLUMN_LOOP = "vlmptq::gptq_column_loop"  # profiler range of the column loop
FACTOR = "vlmptq::factor"  # profiler range of the Hessian's factorization
ASYM_ROWS = "vlmptq::asym_rows"  # ... of GPTAQ's A and P rows (inside the column loop's)
LAZY_UPDATE = "vlmptq::lazy_update"  # ... of the lazy block updates (inside the column loop's)


@dataclass
class SolveResult:
    """What a solver returns for one linear layer."""

    qweight: QuantizedWeight
    seconds: float = 0.0
    info: dict = field(default_factory=dict)  # solver-specific numbers (damping used, chosen mu, ...)


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise SolverError(f"{name} contains {bad} NaN/Inf values; fix the model weights or the calibration data")


def check_square(name: str, t: torch.Tensor, k: int) -> None:
    if t.shape != (k, k):
        raise SolverError(f"{name} must be [{k}, {k}] to match the weight's {k} input features, got {tuple(t.shape)}")


def inverse_cholesky_upper(h: torch.Tensor, damp: float, max_escalations: int = 4) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + lambda I)^-1``, ``lambda = damp * mean(diag H)``.

    If ``H + lambda I`` does not factor, ``lambda`` is multiplied by 10 (with a warning) up to
    ``max_escalations`` times; then a :class:`SolverError` says what to change.
    Returns the factor and the relative damping finally used.
    """
    k = h.shape[0]
    mean_diag = torch.mean(torch.diag(h)).item()
    idx = torch.arange(k, device=h.device)
    rel = damp
    for attempt in range(max_escalations + 1):
        hd = h.clone()
        hd[idx, idx] += rel * mean_diag
        chol, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0 and torch.isfinite(u).all():
                return u, rel
        if attempt < max_escalations:
            new = rel * 10 if rel > 0 else 1e-3
            logger.warning("Hessian is not positive definite with damping %.3g; retrying with %.3g", rel, new)
            rel = new
    raise SolverError(
        f"the Hessian ({k}x{k}) does not factor even with damping {rel:g} x mean(diag H). The layer saw too "
        "few or degenerate calibration inputs: use more calibration samples (--num-samples) or longer ones, "
        "or raise the damping (--damp)."
    )


def _asym_rows(d: torch.Tensor, u: torch.Tensor, alpha: float, i1: int, i2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A[i1:i2, i1:]`` and ``P[i1:i2, i1:]`` (``[B, K - i1]``, column ``c`` = global column ``i1 + c``).

    ``A[j, m] = alpha sum_l dXXT[j, l] U[m, l]`` and ``U[m, l] = 0`` for ``l < m``, so for ``m >= i1``
    only ``l >= i1`` contributes; ``P[j, :] = sum_{m > j} A[j, m] U[m, :]`` needs only ``m > j >= i1``.
    The same triangularity inside the corner: the columns ``[c0, c1)`` of ``A`` need ``l >= c0`` only,
    and those of ``P`` need ``m < c1`` only, so both are formed in up to 4 column chunks, each product
    skipping the corner's zeros (5/8 of the dense flops with 4 chunks).
    """
    ut = u[i1:, i1:]
    dk = d[i1:i2, i1:]
    kk = ut.shape[0]
    chunks = min(4, max(1, kk // 1024))  # products of at least ~1024 columns each
    edges = [kk * c // chunks for c in range(chunks + 1)]
    a = torch.empty_like(dk)
    for c0, c1 in zip(edges, edges[1:]):
        torch.mm(dk[:, c0:], ut[c0:c1, c0:].t(), out=a[:, c0:c1])
    a *= alpha
    at = torch.triu(a, diagonal=1)
    p = torch.empty_like(a)
    for c0, c1 in zip(edges, edges[1:]):
        torch.mm(at[:, :c1], ut[:c1, c0:c1], out=p[:, c0:c1])
    return a, p


def _exact_shift_terms(
    wt: torch.Tensor, u: torch.Tensor, d: torch.Tensor, alpha: float, p_row: torch.Tensor, d1: torch.Tensor,
    i1: int, i2: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact shift of block ``[i1, i2)`` as ``target_i = w_i + shift_base[i] + shift_w[i] . buf``.

    ``U_jj sum_{m >= j} A_mj w_m`` over the current values ``w_m``. Block columns ``m >= j`` hold
    them in ``buf[., 0]``. Columns beyond the block have not been updated yet (lazy batching): their
    stale values give ``shift_base``, and the pending updates from the block's quantized columns
    ``r < i`` (``-U[r, m] / U_rr`` times the error ``buf[r, 1]``, ``+P[r, m]`` times the frozen
    value ``buf[r, 0]``) enter through ``U[i1:i2, i2:] A[i2:, j]`` and ``P[i1:i2, i2:] A[i2:, j]``.
    Returns ``shift_w [B, 2B]`` (coefficients of ``buf.view(2B, N)``) and ``shift_base [B, N]``.
    """
    nb = i2 - i1
    a_col = alpha * (d[i1:, i1:] @ u[i1:i2, i1:].t())  # A[i1:, i1:i2]
    a_out = a_col[nb:]
    shift_base = (a_out.t() @ wt[i2:]) * d1[:, None]  # [B, N]
    ua = (u[i1:i2, i2:] @ a_out) / d1[:, None]  # [B(r), B(i)]
    pa = p_row[:, nb:] @ a_out
    earlier = torch.ones(nb, nb, dtype=torch.bool, device=u.device).triu(1)  # [r, i]: r < i
    vw = torch.where(earlier, pa, a_col[:nb])  # value of column r: through P if quantized, else A
    ve = torch.where(earlier, -ua, 0.0)  # error of column r, once quantized
    shift_w = torch.stack((vw, ve), dim=1) * d1  # [B(r), 2, B(i)] times U_ii
    return shift_w.reshape(2 * nb, nb).t().contiguous(), shift_base


def _fused_block(buf, codes_blk, coef_blk, st, zt, qmul, cf, groups, i1, glen, params_fn, scheme, scale_dtype,
                 maxq) -> None:
    """The column loop of one block through :mod:`.column_loop_triton`, one launch per run of columns that
    share a group; with ``params_fn`` (dynamic grids) a group's (scale, zero) are chosen from the current
    values when its first column is reached, as in the torch loop."""
    nb = len(groups)
    starts = [0] + [i for i in range(1, nb) if groups[i] != groups[i - 1]]
    for a, b in zip(starts, starts[1:] + [nb]):
        g = groups[a]
        if params_fn is not None and (i1 + a) % glen == 0:
            s_g, z_g = params_fn(buf[a : a + glen, 0].t(), scheme, scale_dtype)
            st[g], zt[g] = s_g[:, 0], z_g[:, 0]
            if qmul is not None:
                qmul[a : a + glen] = cf[a : a + glen, None] / st[g]
        column_loop_triton.run_segment(buf, codes_blk, coef_blk, st[g], zt[g], qmul, a, b, maxq)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: WeightScheme,
    *,
    dxxt: torch.Tensor | None = None,
    alpha: float = 0.0,
    correction: Correction = "none",
    static_params: tuple[torch.Tensor, torch.Tensor] | None = None,
    clip_search: bool = False,
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> SolveResult:
    """Quantize ``weight [N, K]`` column by column (GPTQ; GPTAQ with ``dxxt``/``alpha``; VLM-PTQ's
    ``correction``). ``static_params = (scale, zero) [N, G]`` fixes every group's grid up front
    (otherwise each group's grid is chosen when its first column is reached, from the
    error-compensated weights; act-order always uses static groups, computed before permuting).
    Nothing is modified in place; runs on the device of ``weight``.
    """
    n, k = weight.shape
    groups = scheme.groups(k)
    glen = scheme.group_len(k)
    check_square("hessian", hessian, k)
    check_finite("weight", weight)
    check_finite("hessian", hessian)
    if correction not in ("none", "diag", "exact", "target"):
        raise SolverError(f"correction must be 'none', 'diag', 'exact' or 'target', got {correction!r}")
    asym = dxxt is not None and alpha != 0.0
    if correction != "none" and not asym:
        raise SolverError(f"correction={correction!r} needs fp-input statistics (dxxt) and alpha != 0")
    if dxxt is not None:
        check_square("dxxt", dxxt, k)
        check_finite("dxxt", dxxt)
    if block_size <= 0:
        raise SolverError(f"block_size must be positive, got {block_size}")
    if static_params is None and glen < k and block_size % glen:
        block_size = math.ceil(block_size / glen) * glen  # a group's grid is chosen inside one block

    device = weight.device
    fdt = torch.float64 if weight.dtype == torch.float64 else torch.float32  # float64 for exactness tests
    w = weight.detach().to(fdt).clone()
    h = hessian.detach().to(device, fdt).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    d = None
    if asym:
        d = dxxt.detach().to(device, fdt).clone()
        d[:, dead] = 0.0

    params_fn = search_params if clip_search else minmax_params
    if static_params is None and (act_order or glen == k):
        static_params = params_fn(w, scheme, scale_dtype)  # original column order
    if static_params is not None:
        scale, zero = (p.to(device, fdt) for p in static_params)
        if scale.shape != (n, groups) or zero.shape != (n, groups):
            raise SolverError(f"static scale/zero must be [{n}, {groups}], got {tuple(scale.shape)}/{tuple(zero.shape)}")
    else:
        scale = torch.zeros(n, groups, device=device, dtype=fdt)
        zero = torch.zeros(n, groups, device=device, dtype=fdt)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        if d is not None:
            d = d[perm][:, perm]
        group_of = (perm // glen).tolist()  # group of each (permuted) column
    else:
        group_of = [j // glen for j in range(k)]

    with torch.profiler.record_function(FACTOR):
        u, damp_used = inverse_cholesky_upper(h, damp)
    if correction == "target":
        w = w + alpha * ((w @ d) @ u.t()) @ u  # W + alpha W dXXT H^-1, with H^-1 = U^T U
        asym, correction = False, "none"

    # Loop layout: the transpose. Row j of ``wt [K, N]`` is input column j of W, so a column step
    # reads and writes contiguous memory; scales, zeros and codes are kept as ``[G, N]`` / ``[K, N]``.
    # A block's values and errors sit interleaved in ``buf [B, 2, N]``: ``buf[i, 0]`` = w_j (current
    # value; frozen once column j is quantized, so it is also the pre-quantization value the P term
    # needs) and ``buf[i, 1]`` = w_j - q_j (the error times U_jj). A column's update of the block's
    # later columns is then a single matmul over views: ``-U[j, :] / U_jj`` times the errors, plus
    # ``P[j, :]`` times the values for GPTAQ. Per column that is 6 kernels for GPTQ, GPTAQ and VLM-PTQ's
    # diagonal correction alike (docs/algorithm.md). GPTAQ's lazy update of later blocks is GPTQ's fp32
    # product plus the P term's as a second product, in TF32 on CUDA like the P rows it multiplies (one
    # fp32 ``k = 2B`` product costs twice GPTQ's update there; on the CPU the two cost the same as one).
    wt = w.t().contiguous()  # [K, N]
    st, zt = scale.t().contiguous(), zero.t().contiguous()  # [G, N]
    codes_t = torch.empty(k, n, device=device, dtype=fdt)  # [K, N]
    # (1 + C_j) / scale per column of a block, precomputed when the scales are static
    group_t = torch.tensor(group_of, device=device) if correction == "diag" and static_params is not None else None
    proxy_loss = torch.zeros((), device=device, dtype=fdt)
    maxq = float(scheme.maxq)
    # on CUDA a block's column loop runs as one Triton launch per run of columns sharing a group
    # (column_loop_triton: the torch loop is host-bound there; under act-order the runs are short); the
    # exact shift stays in torch
    fused = column_loop_triton.enabled(device) and fdt == torch.float32 and correction in ("none", "diag")

    # named for profilers: benchmarks/solvers.py counts the kernels this loop launches per column
    with torch.profiler.record_function(COLUMN_LOOP):
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            nb = i2 - i1
            buf = torch.zeros(nb, 2, n, device=device, dtype=fdt)
            buf[:, 0] = wt[i1:i2]
            w1, e1 = buf[:, 0], buf[:, 1]  # [B, N] views
            d1 = torch.diagonal(u[i1:i2, i1:i2])  # U_jj
            un = u[i1:i2, i1:] / d1[:, None]  # [B, K - i1]: U[j, :] / U_jj
            if asym:
                with torch.profiler.record_function(ASYM_ROWS), tf32_products(device):
                    a_row, p_row = _asym_rows(d, u, alpha, i1, i2)  # A, P [i1:i2, i1:]
                # [B, B, 2]: the block's later column c += coef[i, c] . buf[i]; stored (c, value/error) so a
                # column step's factor coef[i, i+1:nb] is a plain slice (two view ops fewer per column than
                # a transposed one: the torch loop is bound by such host-side calls, docs/algorithm.md)
                coef = torch.stack((p_row[:, :nb], -un[:, :nb]), dim=2)
            if correction == "diag":
                cf = 1.0 + torch.diagonal(a_row[:, :nb]) * d1  # 1 + C_j, VLM-PTQ's diagonal correction
                qmul = torch.empty(nb, n, device=device, dtype=fdt)  # (1 + C_j) / scale, per column
                if static_params is not None:
                    qmul[:] = cf[:, None] / st[group_t[i1:i2]]
            if correction == "exact":
                with tf32_products(device):
                    shift_w, shift_base = _exact_shift_terms(wt, u, d, alpha, p_row, d1, i1, i2)
            if fused:
                _fused_block(buf, codes_t[i1:i2], coef if asym else un[:, :nb].contiguous(),
                             st, zt, qmul if correction == "diag" else None, cf if correction == "diag" else None,
                             group_of[i1:i2], i1, glen, params_fn if static_params is None else None, scheme,
                             scale_dtype, maxq)
            for i in range(0 if fused else nb):  # the torch loop (CPU, or what the fused one does not take)
                j = i1 + i
                g = group_of[j]
                x = w1[i]
                if static_params is None and j % glen == 0:
                    s_g, z_g = params_fn(w1[i : i + glen].t(), scheme, scale_dtype)
                    st[g], zt[g] = s_g[:, 0], z_g[:, 0]
                    if correction == "diag":
                        qmul[i : i + glen] = cf[i : i + glen, None] / st[g]
                c = codes_t[j]
                if correction == "diag":
                    torch.addcmul(zt[g], x, qmul[i], out=c)  # zero + w_j (1 + C_j) / scale
                else:
                    target = x
                    if correction == "exact":  # w_j + U_jj * (sum_{i >= j} w_i A_ij, with pending updates)
                        target = torch.addmv(x + shift_base[i], buf.view(2 * nb, n).t(), shift_w[i])
                    torch.addcdiv(zt[g], target, st[g], out=c)  # zero + target / scale
                c.clamp_(0.0, maxq).round_()  # = clamp(round(.)), the bounds being integers
                torch.addcmul(x, c - zt[g], st[g], value=-1.0, out=e1[i])  # w_j - q_j
                if i + 1 < nb:
                    if asym:
                        w1[i + 1 :].addmm_(coef[i, i + 1 : nb], buf[i])
                    else:
                        w1[i + 1 :].addr_(un[i, i + 1 : nb], e1[i], alpha=-1.0)
            proxy_loss += (e1 / d1[:, None]).square().sum() / 2
            if i2 < k:  # lazy batch update of the later blocks: GPTQ's in fp32, then GPTAQ's P term as a product
                # of its own, in TF32 on CUDA (an alpha-sized correction, formed in TF32 by _asym_rows)
                with torch.profiler.record_function(LAZY_UPDATE):
                    wt[i2:].addmm_(un[:, nb:].t(), e1, alpha=-1.0)
                    if asym:
                        with tf32_products(device):
                            wt[i2:].addmm_(p_row[:, nb:].t(), w1)

    codes = codes_t.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qweight = QuantizedWeight(
        codes=codes.to(torch.uint8).contiguous(),
        scale=st.t().to(scale_dtype).contiguous(),
        zero=zt.t().to(torch.uint8).contiguous(),
        scheme=scheme,
    )
    info = {"damp": damp_used, "proxy_loss": proxy_loss.item()}
    if not math.isfinite(info["proxy_loss"]):
        raise SolverError("the solver produced non-finite values; raise the damping (--damp)")
    return SolveResult(qweight=qweight, info=info)
