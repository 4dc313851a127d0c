"""Torch reference for the low-bit GEMM: unpack, dequantize, matmul. Runs on any device.

Input layout: the checkpoint layout of :mod:`vllm_plugin.kernels.base` (dense packing).
Every faster kernel is tested against :func:`dequantize_packed` / :func:`reference_linear`.
"""

from __future__ import annotations

import torch

from vlmptq.checkpoint.packing import unpack_columns, unpack_rows


def dequantize_packed(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight in the scale's dtype (fp32 arithmetic, one rounding)."""
    n, groups = weight_scale.shape
    glen = in_features // groups
    q = unpack_rows(weight_packed, bits, in_features).to(torch.float32)
    if weight_zero_point is None:
        z = torch.full((n, groups), float(1 << (bits - 1)), device=q.device)
    else:
        z = unpack_columns(weight_zero_point, bits, n).to(torch.float32)
    w = (q - z.repeat_interleave(glen, dim=1)) * weight_scale.float().repeat_interleave(glen, dim=1)
    return w.to(weight_scale.dtype)


def reference_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ dequant(W).T + bias`` in x's dtype."""
    w = dequantize_packed(weight_packed, weight_scale, weight_zero_point, bits, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
