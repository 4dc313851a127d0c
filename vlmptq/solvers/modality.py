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

from vlmptq.quant.grid import expand_groups, fake_quantize, search_params
from vlmptq.quant.scheme import WeightScheme


def layer_loss(
    weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor, dxxt: torch.Tensor | None = None
) -> torch.Tensor:
    """Closed-form layer loss ``tr(E H E^T) - 2 tr(E dXXT^T W^T)`` (the second term only with dxxt).

    ``weight``, ``qweight``: ``[N, K]``; ``hessian``, ``dxxt``: ``[K, K]``. Returns an fp32 scalar.
    """
    w = weight.float()
    e = qweight.float() - w
    loss = ((e @ hessian.float()) * e).sum()
    if dxxt is not None:
        loss = loss - 2.0 * ((e @ dxxt.float().t()) * w).sum()
    return loss


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
) -> ModalityChoice:
    """Search ``mu`` over ``mu_grid``; return the best static (scale, zero) and every mu's score."""
    if not mu_grid:
        raise ValueError("mu_grid must hold at least one value in [0, 1]")
    w = weight.float()
    glen = scheme.group_len(w.shape[1])
    scores: dict[float, float] = {}
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None  # (score, mu, scale, zero)
    for mu in mu_grid:
        imp = fused_importance(diag_vision, diag_text, mu)
        scale, zero = search_params(w, scheme, scale_dtype, importance=imp)
        q = fake_quantize(w, expand_groups(scale, glen), expand_groups(zero, glen), scheme.maxq)
        score = layer_loss(w, q, hessian, dxxt).item()
        scores[float(mu)] = score
        if best is None or score < best[0]:
            best = (score, float(mu), scale, zero)
    _, mu, scale, zero = best
    return ModalityChoice(scale=scale, zero=zero, mu=mu, scores=scores)
