"""The quantization grid: per-group scale / zero point, rounding, and clip search.

Shapes: a weight ``W [N, K]`` is viewed as groups ``[N, G, g]`` (``G = K / g``); parameters are
``scale [N, G]`` and ``zero [N, G]`` (unsigned codes, float tensors holding integers). Scales are
rounded to ``scale_dtype`` (the checkpoint's dtype) *before* zero points and codes are computed, so
the codes the solver picks are exactly the ones the checkpoint dequantizes.
"""

from __future__ import annotations

import os

import torch

from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme

CLIP_SEARCH = "vlmptq::clip_search"  # profiler range (benchmarks/solvers.py --profile)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Unsigned codes ``clamp(round(x / scale) + zero, 0, maxq)`` (float tensor of integers)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` onto the grid and map back: ``(codes - zero) * scale``."""
    return (quantize_codes(x, scale, zero, maxq) - zero) * scale


def _round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny if dtype.is_floating_point else 1e-12
    return scale.clamp_min(tiny).to(dtype).to(torch.float32).clamp_min(tiny)


def range_params(
    xmin: torch.Tensor, xmax: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[xmin, xmax]`` (zero always representable)."""
    maxq = scheme.maxq
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if scheme.symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = _round_scale((xmax - xmin) / maxq, scale_dtype)
    if scheme.symmetric:
        zero = torch.full_like(scale, float(scheme.offset))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def _grouped(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    n, k = w.shape
    g = scheme.group_len(k)
    return w.reshape(n, scheme.groups(k), g)  # [N, G, g]


def minmax_params(
    w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max parameters for ``w [N, K]`` -> ``scale, zero [N, G]``."""
    wg = _grouped(w.float(), scheme)
    return range_params(wg.amin(-1), wg.amax(-1), scheme, scale_dtype)


def search_params_multi(
    w: torch.Tensor,
    scheme: WeightScheme,
    importances: torch.Tensor,
    scale_dtype: torch.dtype = torch.bfloat16,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.0,
    mix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip search for several column weightings at once.

    For each weighting ``m`` (``importances [M, K]``) and each group, the shrink
    ``p in {1, 1-1/grid, ..., 1-max_shrink}`` of the min-max range that minimises
    ``sum_k importances[m, k] * |w - fake_quant(w)|^norm``. The rounding error of every candidate is
    computed once and shared by all weightings (one pass over ``w`` per candidate, not ``M``).

    With ``mix [M, B]`` the ``importances [B, K]`` are a basis and the weightings are its mixtures
    ``sum_b mix[m, b] importances[b]``: each candidate's error is weighted by the ``B`` basis rows and
    the ``M`` errors are then ``sum_b mix[m, b] err_b`` -- equal in exact arithmetic, at ``B`` weighted
    sums per element whatever ``M`` is (VLM-PTQ's ``mu`` grid: 2, vision and text, for its 7 ``mu``).
    On the CPU, rows are processed in cache-sized chunks; on CUDA a fused Triton kernel tries every
    candidate in one pass (:mod:`vlmptq.quant.search_triton`). Returns ``scale, zero [M, N, G]``.
    """
    k = w.shape[1]
    if importances.dim() != 2 or importances.shape[1] != k:
        rows = "M" if mix is None else "B"
        raise ValueError(f"importances must have shape ({rows}, {k}), got {tuple(importances.shape)}")
    if mix is not None and (mix.dim() != 2 or mix.shape[1] != importances.shape[0]):
        raise ValueError(f"mix must have shape (M, {importances.shape[0]}), got {tuple(mix.shape)}")
    glen = scheme.group_len(k)
    scheme.groups(k)  # validates the group size
    m = importances.shape[0] if mix is None else mix.shape[0]
    with torch.profiler.record_function(CLIP_SEARCH):
        if w.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
            from vlmptq.quant import search_triton

            if search_triton.can_run(w, glen, max(m, importances.shape[0]), scale_dtype)[0]:
                return search_triton.search_params_multi_triton(
                    w, scheme.maxq, scheme.symmetric, glen, importances, scale_dtype, grid, max_shrink, norm, mix
                )
        return search_torch(w, scheme, importances, scale_dtype, grid, max_shrink, norm, mix)


def search_torch(
    w: torch.Tensor, scheme: WeightScheme, importances: torch.Tensor, scale_dtype: torch.dtype,
    grid: int, max_shrink: float, norm: float, mix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch implementation of :func:`search_params_multi` (any device; the reference)."""
    n, k = w.shape
    groups, glen = scheme.groups(k), scheme.group_len(k)
    imp = importances.float().reshape(-1, groups, glen)  # [B, G, g]
    b = imp.shape[0]
    if mix is not None:
        mix = mix.to(device=w.device, dtype=torch.float32)[:, :, None, None]  # [M, B, 1, 1]
    m = b if mix is None else mix.shape[0]
    scale = torch.empty(m, n, groups, device=w.device)
    zero = torch.empty(m, n, groups, device=w.device)
    chunk = n if w.is_cuda else max(1, (1 << 17) // k)  # 512 KiB per fp32 temporary (25-30% faster than 256)
    shrinks = [1.0 - i / grid for i in range(int(max_shrink * grid))]
    for r0 in range(0, n, chunk):
        wg = w[r0 : r0 + chunk].float().reshape(-1, groups, glen)  # [n_c, G, g]
        xmin, xmax = wg.amin(-1), wg.amax(-1)
        best_err = torch.full((m, wg.shape[0], groups), float("inf"), device=w.device)
        best_scale = torch.zeros_like(best_err)
        best_zero = torch.zeros_like(best_err)
        for p in shrinks:
            s, z = range_params(p * xmin, p * xmax, scheme, scale_dtype)
            s3, z3 = s.unsqueeze(-1), z.unsqueeze(-1)  # fake_quantize(wg) - wg, in place: one allocation
            e = torch.div(wg, s3).round_().add_(z3).clamp_(0, scheme.maxq).sub_(z3).mul_(s3).sub_(wg)
            e = e.square_() if norm == 2.0 else e.abs_().pow_(norm)
            err = (e * imp[0]).sum(-1).unsqueeze(0) if b == 1 else torch.einsum("ngk,bgk->bng", e, imp)
            if mix is not None:  # the products, then their sum over b (as the Triton kernel)
                err = (mix * err).sum(1)  # [M, n_c, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            best_zero = torch.where(better, z, best_zero)
        scale[:, r0 : r0 + chunk] = best_scale
        zero[:, r0 : r0 + chunk] = best_zero
    return scale, zero


def search_params(
    w: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype = torch.bfloat16,
    importance: torch.Tensor | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip search: per group, the shrink ``p in {1, 1-1/grid, ..., 1-max_shrink}`` of the min-max
    range minimising ``sum_k importance[k] * |w - fake_quant(w)|^norm`` (importance = 1 if None).

    ``importance [K]`` weights input columns (VLM-PTQ's modality-fused Hessian diagonal).
    Returns ``scale, zero [N, G]``.
    """
    if importance is None:
        importance = torch.ones(w.shape[1], device=w.device)
    elif importance.shape != (w.shape[1],):
        raise ValueError(f"importance must have shape ({w.shape[1]},), got {tuple(importance.shape)}")
    scale, zero = search_params_multi(w, scheme, importance.unsqueeze(0), scale_dtype, grid, max_shrink, norm)
    return scale[0], zero[0]


def expand_groups(p: torch.Tensor, group_len: int) -> torch.Tensor:
    """``[N, G]`` per-group values -> ``[N, G * group_len]`` per column."""
    return p.repeat_interleave(group_len, dim=1)


def quantize_with_params(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedWeight:
    """Round ``w [N, K]`` with fixed ``scale, zero [N, G]`` (round-to-nearest)."""
    glen = scheme.group_len(w.shape[1])
    codes = quantize_codes(w.float(), expand_groups(scale, glen), expand_groups(zero, glen), scheme.maxq)
    return QuantizedWeight(
        codes=codes.to(torch.uint8), scale=scale.to(scale_dtype), zero=zero.to(torch.uint8), scheme=scheme
    )


def quantize_rtn(
    w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype = torch.bfloat16, clip_search: bool = False
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w [N, K]`` with min-max (or clip-searched) parameters."""
    params = search_params if clip_search else minmax_params
    scale, zero = params(w, scheme, scale_dtype)
    return quantize_with_params(w, scale, zero, scheme, scale_dtype)
