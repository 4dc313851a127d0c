"""CPU kernel for 8-bit layers (an 8-bit ``lm_head``, ``--bits 8``): torch's int8 weight GEMM per group.

vLLM-CPU has no group-wise 8-bit kernel, and the torch reference unpacks and dequantizes the whole
weight in fp32 on every call: 1.6 s per decode step for SmolLM2's 49152 x 576 head on a 2-core
machine, against 6 ms for the same head in bf16 (``benchmarks/results/cpu-head-2026-11-28.md``:
this kernel 6.9 ms). Two paths, chosen by M:

* small M: ``torch._weight_int8pack_mm(x, q, s) = (x @ q^T) * s`` (int8 ``q [N, K]``, one scale per
  output channel) is a fast CPU GEMV. A group-wise asymmetric layer is a sum of such products:
      y = sum_g [ s_g * (x_g @ (q_g - 128)^T) ] - xsum @ (s * (z - 128))^T
  with ``x_g`` the activations of group g, ``xsum [M, G]`` their per-group sums: the codes are
  stored as the exact signed ``q - 128`` and the zero points fold into one small matmul. Products are
  summed in fp32 (each group's comes back rounded to the activation dtype). Its time grows
  linearly with M (it is a GEMV), hence
* larger M: dequantize into an act-dtype buffer (``code - zero`` is an exact integer in bf16 / fp16,
  then one rounding by the scale, as the reference) and ``F.linear``: ~35-70 ms for that head plus
  the dense matmul.
The crossover (``INT8PACK_MAX_M``) was measured on this project's 2-core AVX512/AMX machines;
``benchmarks/cpu_head.py`` times the result beside bf16 and the other kernels.

torch bug worked around (torch 2.13, probed 2026-11-28 on AVX512-BF16 / AMX): with bf16 activations
``_weight_int8pack_mm`` returns garbage or crashes when K is not a multiple of 16; groups of such a
length always take the dequantize path.

Layout (what :meth:`CpuW8Kernel.prepare` returns; ``G`` groups of ``g`` columns):
    qweight  int8 [G, N, g]      codes - 128, group-major: each group's slice is contiguous
    scale    act dtype [G, N]
    zero     act dtype [N, G]    zero point - 128 (exact; the dequantize path); absent for symmetric
                                 layers (z = 128), like zterm
    zterm    float32 [G, N]      scale * (zero point - 128) (the GEMV path's zero-point term)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch

from vlmptq.checkpoint.packing import unpack_columns, unpack_rows
from vllm_plugin.kernels.base import WNA16Kernel, WNA16LayerConfig
from vllm_plugin.kernels.ops import register_op

# largest M that takes the int8 GEMV (one call per group) instead of dequantize + matmul: the
# crossover on SmolLM2's head, one thread (bf16 16 rows: 42 vs 69 ms; fp32 and fp16 have no fast GEMV)
INT8PACK_MAX_M = {torch.bfloat16: 16, torch.float32: 2, torch.float16: 1}
SUPPORTED_DTYPES = tuple(INT8PACK_MAX_M)


def uses_int8pack(m: int, group_len: int, dtype: torch.dtype) -> bool:
    """Whether ``m`` rows take the per-group int8 GEMV (else dequantize + matmul)."""
    return m <= INT8PACK_MAX_M[dtype] and group_len % 16 == 0


def _cpu_w8_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                 zterm: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [..., K] @ dequant(W).T + bias`` on the layout in the module docstring."""
    groups, n, glen = qweight.shape
    x2 = x.reshape(-1, groups * glen).contiguous()
    m = x2.shape[0]
    if uses_int8pack(m, glen, x.dtype):
        xg = x2.view(m, groups, glen)
        acc = torch.zeros((m, n), dtype=torch.float32)
        for g in range(groups):
            acc.add_(torch._weight_int8pack_mm(xg[:, g], qweight[g], scale[g]))
        if zterm is not None:  # - sum_g xsum_g * s_g (z_g - 128)
            acc.sub_(xg.float().sum(-1) @ zterm)
        if bias is not None:
            acc.add_(bias.float())
        out = acc.to(x.dtype)
    else:
        w = torch.empty((n, groups, glen), dtype=x.dtype)
        w.copy_(qweight.transpose(0, 1))  # q - 128: exact
        if zero is not None:
            w.sub_(zero[:, :, None])  # q - z: an integer in [-255, 255], exact in bf16 / fp16
        w.mul_(scale.t()[:, :, None])  # one rounding, as the reference
        out = torch.nn.functional.linear(x2, w.view(n, groups * glen), bias)
    return out.reshape(*x.shape[:-1], n)


def _cpu_w8_gemm_fake(x, qweight, scale, zero, zterm, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


cpu_w8_gemm = register_op("cpu_w8_gemm", _cpu_w8_gemm, _cpu_w8_gemm_fake, "CPU")


def prepare_cpu_w8(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
                   in_features: int, act_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (:mod:`vllm_plugin.kernels.base`) -> this kernel's (module docstring)."""
    n, groups = weight_scale.shape
    glen = in_features // groups
    codes = unpack_rows(weight_packed, 8, in_features).to(torch.int16) - 128  # [N, K]
    tensors = {"qweight": codes.to(torch.int8).view(n, groups, glen).transpose(0, 1).contiguous(),
               "scale": weight_scale.t().to(act_dtype).contiguous()}
    if weight_zero_point is not None:
        zero = unpack_columns(weight_zero_point, 8, n).to(torch.int16) - 128  # [N, G]
        tensors["zero"] = zero.to(act_dtype).contiguous()
        tensors["zterm"] = tensors["scale"].float() * zero.t()  # the scales the GEMV multiplies by
    return tensors


class CpuW8Kernel(WNA16Kernel):
    """8-bit layers on CPU: torch's int8 GEMV per group at small M, dequantize + matmul above."""

    name = "cpu_w8"

    @classmethod
    def can_implement(cls, config: WNA16LayerConfig) -> tuple[bool, str | None]:
        reasons = []
        if config.device_type != "cpu":
            reasons.append(f"runs on CPU only (layer is on {config.device_type})")
        if config.bits != 8:
            reasons.append(f"{config.bits}-bit weights (takes 8)")
        if config.act_dtype not in SUPPORTED_DTYPES:
            reasons.append(f"activation dtype {config.act_dtype} (takes {', '.join(map(str, SUPPORTED_DTYPES))})")
        if config.group_size <= 0 or config.in_features % config.group_size:
            reasons.append(f"group size {config.group_size} does not divide in_features {config.in_features}")
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            reasons.append("this torch has no aten._weight_int8pack_mm")
        return (False, "; ".join(reasons)) if reasons else (True, None)

    def prepare(self, weight_packed, weight_scale, weight_zero_point):
        c = self.config
        if tuple(weight_scale.shape) != (c.out_features, c.num_groups):
            raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected "
                             f"{(c.out_features, c.num_groups)} (out_features, in_features // group_size)")
        return prepare_cpu_w8(weight_packed, weight_scale, weight_zero_point, c.in_features, c.act_dtype)

    def apply(self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, bias=None) -> torch.Tensor:
        if x.dtype != self.config.act_dtype:
            raise TypeError(f"activations are {x.dtype} but the layer was prepared for {self.config.act_dtype}")
        op = torch.ops.vlmptq.cpu_w8_gemm if torch.compiler.is_compiling() else _cpu_w8_gemm
        return op(x, tensors["qweight"], tensors["scale"], tensors.get("zero"), tensors.get("zterm"), bias)
