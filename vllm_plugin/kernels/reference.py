"""Torch reference for the low-bit GEMM: unpack, dequantize, matmul. Runs on any device.

Input layout: the checkpoint layout of :mod:`vllm_plugin.kernels.base` (dense packing).
Every faster kernel is tested against :func:`dequantize_packed` / :func:`reference_linear`.
:class:`ReferenceWNA16Kernel` serves them as the custom op ``torch.ops.vlmptq.reference_gemm``
(the last kernel in the selection list: it runs wherever torch runs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vlmptq.checkpoint.packing import unpack_columns, unpack_rows
from vllm_plugin.kernels.base import WNA16Kernel, WNA16LayerConfig
from vllm_plugin.kernels.ops import register_op


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


# --- the reference as a kernel: a torch operator (opaque to torch.compile) with a fake impl ---


def _reference_gemm(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    return reference_linear(
        x, weight_packed, weight_scale, weight_zero_point, bits, in_features, bias
    )


def _reference_gemm_fake(
    x, weight_packed, weight_scale, weight_zero_point, bias, bits, in_features
):
    return x.new_empty((*x.shape[:-1], weight_scale.shape[0]))


# :func:`reference_linear` as ``torch.ops.vlmptq.reference_gemm`` (any device).
reference_gemm = register_op("reference_gemm", _reference_gemm, _reference_gemm_fake)


class ReferenceWNA16Kernel(WNA16Kernel):
    """Unpack, dequantize, matmul on every call. Correct on any device and for every scheme; slow
    (it re-unpacks the whole weight per call): the fallback and the oracle, not a fast path."""

    name = "reference"

    @classmethod
    def can_implement(cls, config: WNA16LayerConfig) -> tuple[bool, str | None]:
        if config.in_features % config.group_size:
            return (
                False,
                f"group_size {config.group_size} does not divide in_features {config.in_features}",
            )
        return True, None

    def prepare(self, weight_packed, weight_scale, weight_zero_point):
        tensors = {"weight_packed": weight_packed, "weight_scale": weight_scale}
        if weight_zero_point is not None:
            tensors["weight_zero_point"] = weight_zero_point
        return tensors

    def apply(
        self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, bias=None
    ) -> torch.Tensor:
        return torch.ops.vlmptq.reference_gemm(
            x,
            tensors["weight_packed"],
            tensors["weight_scale"],
            tensors.get("weight_zero_point"),
            bias,
            self.config.bits,
            self.config.in_features,
        )
