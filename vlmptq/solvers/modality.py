"""VLM-PTQ's modality-aware quantization parameters, and the closed-form layer loss that scores them.

Given per-modality Hessian diagonals ``d_v = diag(H_vision)``, ``d_t = diag(H_text)`` (``[K]``), the
importance of input column ``k`` for a fusion weight ``mu`` is ``M_mu[k] = mu d_v[k] + (1-mu) d_t[k]``.
Each group's (scale, zero) minimise ``sum_k M_mu[k] (W[:, k] - quant(W[:, k]))^2`` over a shrink grid
of the min-max range; ``mu`` is chosen from a small grid by the asymmetric layer loss of plain
rounding with those parameters, computed from the statistics alone (no forward passes):
    L(Q) = tr(E H E^T) - 2 tr(E dXXT^T W^T),   E = Q - W
which equals ``(2/N) ||W X~ - Q X||^2`` up to a constant independent of ``Q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmptq.quant.grid import expand_groups, fake_quantize, search_params_multi
from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers.precision import tf32_products


def layer_loss(
    weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor, dxxt: torch.Tensor | None = None
) -> torch.Tensor:
    """Closed-form layer loss ``tr(E H E^T) - 2 tr(E dXXT^T W^T)`` (the second term only with dxxt).

    ``weight``, ``qweight``: ``[N, K]``; ``hessian``, ``dxxt``: ``[K, K]``. Returns an fp32 scalar.
    """
    w = weight.float()
    return _loss(qweight.float() - w, hessian.float(), None if dxxt is None else w @ dxxt.float())


def _loss(e: torch.Tensor, hessian: torch.Tensor, w_dxxt: torch.Tensor | None) -> torch.Tensor:
    """``sum(E * (E H - 2 W dXXT))``: ``tr(E dXXT^T W^T) = sum(E * (W dXXT))``, so with ``W dXXT``
    computed once, scoring a candidate ``E [N, K]`` costs one ``N x K x K`` matmul, not two."""
    g = e @ hessian
    if w_dxxt is not None:
        g -= 2.0 * w_dxxt
    return (g * e).sum()


def fused_importance(diag_vision: torch.Tensor, diag_text: torch.Tensor, mu: float) -> torch.Tensor:
    """``M_mu = mu * diag_vision + (1 - mu) * diag_text`` with a tiny floor, so a column that one
    modality never excites still counts a little (and an all-zero modality cannot zero the search)."""
    m = mu * diag_vision.float() + (1.0 - mu) * diag_text.float()
    floor = 1e-6 * (diag_vision.float().mean() + diag_text.float().mean()) + 1e-12
    return m.clamp_min(0) + floor


@dataclass
class ModalityChoice:
    scale: torch.Tensor  # [N, G] fp32 (holding values representable in the scale dtype)
    zero: torch.Tensor  # [N, G] fp32 integers
    mu: float
    scores: dict[float, float]  # mu -> closed-form loss of round-to-nearest


def choose_modality_params(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    dxxt: torch.Tensor | None,
    diag_vision: torch.Tensor,
    diag_text: torch.Tensor,
    scheme: WeightScheme,
    mu_grid: tuple[float, ...],
    scale_dtype: torch.dtype = torch.bfloat16,
    score_rows: int | None = 2048,
) -> ModalityChoice:
    """Search ``mu`` over ``mu_grid``; return the best static (scale, zero) and every mu's score.

    The clip searches of all ``mu`` share one pass per shrink candidate. Scoring costs
    ``O(rows * K^2)`` per ``mu``; the loss is a sum over output rows, so for layers with more than
    ``score_rows`` rows it is estimated on an evenly strided subset of rows (the same for every
    ``mu``), which keeps the search cheap next to the GPTQ loop; ``W dXXT`` is computed once for all
    ``mu`` (:func:`_loss`); on CUDA the scores use TF32 (:mod:`vlmptq.solvers.precision`).
    ``score_rows=None`` scores all rows.

    The clip search is row by row, so with a row subset only those rows are searched for every ``mu``;
    the chosen ``mu`` is then searched once over all rows: the same result as searching every ``mu``
    over all rows, at ``M * rows + N`` rows searched instead of ``M * N`` (a 7B gate_up: 52k against 265k;
    on an H200 the all-rows search of the 3584-row o_proj took 9.4 ms, 2.5x the GPTQ loop's group searches).
    """
    if not mu_grid:
        raise ValueError("mu_grid must hold at least one value in [0, 1]")
    w = weight.float()
    n = w.shape[0]
    glen = scheme.group_len(w.shape[1])
    imps = torch.stack([fused_importance(diag_vision, diag_text, mu) for mu in mu_grid])  # [M, K]
    subset = score_rows is not None and n > score_rows
    rows = slice(0, n, -(-n // score_rows)) if subset else slice(None)
    w_rows, h = w[rows], hessian.float()
    scales, zeros = search_params_multi(w_rows.contiguous(), scheme, imps, scale_dtype)  # [M, rows, G]
    scores: dict[float, float] = {}
    best = 0
    with tf32_products(w.device):
        w_dxxt = None if dxxt is None else w_rows @ dxxt.float()  # shared by every mu
        for i, mu in enumerate(mu_grid):
            q = fake_quantize(w_rows, expand_groups(scales[i], glen), expand_groups(zeros[i], glen), scheme.maxq)
            scores[float(mu)] = _loss(q - w_rows, h, w_dxxt).item()
            if scores[float(mu)] < scores[float(mu_grid[best])]:
                best = i
    if subset:  # the chosen mu over every row
        scales, zeros = search_params_multi(w, scheme, imps[best : best + 1], scale_dtype)
        best_scale, best_zero = scales[0], zeros[0]
    else:
        best_scale, best_zero = scales[best], zeros[best]
    return ModalityChoice(scale=best_scale, zero=best_zero, mu=float(mu_grid[best]), scores=scores)
