"""CPU kernels: vLLM-CPU's own 4-bit GEMMs, fed 2/3/4-bit codes widened to 4 bits.

vLLM-CPU ships two int4 weight GEMMs (the ones its stock ``CPUWNA16`` kernel calls); both compute
``x @ ((q - z) * s).T`` with 4-bit unsigned codes and explicit zero points. Any 2- or 3-bit code is
also a valid 4-bit code with the same zero point, so widening the codes reuses those kernels for
W2/W3 at 4-bit memory cost (no stock CPU kernel takes 2/3-bit; the torch reference re-unpacks the
whole weight per call and is ~100x slower).

Input: the checkpoint layout of :mod:`vllm_plugin.kernels.base` (one partition, dense packing).

Kernel layouts (``K`` in, ``N`` out, ``G`` groups; 4-bit values little-end first in each int32):
``cpu_wna16`` (``torch.ops._C.cpu_gemm_wna16``, bf16/fp16 activations, exact dequant):
    q_weight  int32 [N/16, 2K]  codes packed along N (8 per word), then blocks of 16 output
                                channels made contiguous: [K, N/8] -> [N/16, K, 2] -> [N/16, 2K]
    scales    act dtype [G, N]
    zeros     int32 [G, N/8]    packed along N; None only for symmetric 4-bit (implied 8)
``cpu_w4a8`` (``torch.ops._C.int4_scaled_mm_cpu``: activations quantized to int8 per token on the
fly, AMX; vLLM-CPU's default for bf16 4-bit on AMX machines, ``VLLM_CPU_INT4_W4A8=1``):
    codes and zeros [K, N] / [G, N] with each 8 output channels reordered (0,2,4,6,1,3,5,7), packed
    along N, then blocked by ``torch.ops._C.convert_weight_packed_scale_zp`` (AWQ mode).

Graphs traced by torch.compile record the ``torch.ops.vlmptq`` operators; eager calls skip that
extra dispatcher hop (~3 us per GEMM, what a decode-size int4 GEMM costs on a small layer) and call
the same Python implementation directly.

The ``_C`` ops exist once vLLM's C extension is loaded (always inside a vLLM worker); this module
imports torch only, so it stays importable where vLLM is absent.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

import torch

from vlmptq.checkpoint.packing import pack_rows, unpack_columns, unpack_rows
from vllm_plugin.kernels.base import WNA16Kernel, WNA16LayerConfig
from vllm_plugin.kernels.ops import register_op

_AWQ = 0  # vLLM's CPUQuantAlgo.AWQ
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _has_c_op(name: str) -> bool:
    try:
        return hasattr(torch.ops._C, name)
    except Exception:  # namespace lookups can raise before any _C library is loaded
        return False


def _codes_and_zeros(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    config: WNA16LayerConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes ``[N, K]`` and zero points ``[N, G]`` (int32; symmetric: 2^(b-1))."""
    n, k, b = config.out_features, config.in_features, config.bits
    codes = unpack_rows(weight_packed, b, k).to(torch.int32)
    if weight_zero_point is None:
        zeros = torch.full((n, weight_scale.shape[1]), 1 << (b - 1), dtype=torch.int32)
    else:
        zeros = unpack_columns(weight_zero_point, b, n).to(torch.int32)
    return codes, zeros


def _check_cpu_4bit(config: WNA16LayerConfig) -> tuple[bool, str | None]:
    if config.device_type != "cpu":
        return False, f"runs on CPU only (layer is on {config.device_type})"
    if config.bits not in (2, 3, 4):
        return (
            False,
            f"{config.bits}-bit codes do not fit the 4-bit CPU kernels (2, 3 and 4 bit do)",
        )
    if config.in_features % 32 or config.out_features % 32:
        return False, (
            f"partition K={config.in_features}, N={config.out_features} must both be "
            "multiples of 32"
        )
    if config.group_size % 2:
        return False, f"group_size {config.group_size} must be even"
    if config.in_features % config.group_size:
        return False, f"group_size {config.group_size} does not divide K={config.in_features}"
    return True, None


def isa_hint(dtype: torch.dtype) -> str:
    """The ISA string ``cpu_gemm_wna16`` takes (as vLLM's CPUWNA16 picks it)."""
    machine = platform.machine().lower()
    if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
        return "amx"
    if machine.startswith("riscv"):
        return "rvv"
    if dtype == torch.bfloat16 and machine.startswith(("ppc", "powerpc")):
        return "vsx"
    return "vec"


# ------------------------------------------------------------------------ cpu_wna16 (exact A16)


def _cpu_wna16_gemm(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    isa: str,
) -> torch.Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # [M, K]
    out = torch.empty((x2.shape[0], scales.shape[1]), dtype=x.dtype, device=x.device)
    torch.ops._C.cpu_gemm_wna16(x2.contiguous(), q_weight, out, scales, zeros, bias, 8, isa)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], scales.shape[1])


def _cpu_wna16_gemm_fake(x, q_weight, scales, zeros, bias, isa):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


cpu_wna16_gemm = register_op("cpu_wna16_gemm", _cpu_wna16_gemm, _cpu_wna16_gemm_fake, "CPU")


class CpuWNA16Kernel(WNA16Kernel):
    """vLLM-CPU's ``cpu_gemm_wna16`` (bf16/fp16 activations) on widened 2/3/4-bit codes."""

    name = "cpu_wna16"

    @classmethod
    def can_implement(cls, config: WNA16LayerConfig) -> tuple[bool, str | None]:
        ok, why = _check_cpu_4bit(config)
        if not ok:
            return ok, why
        if config.act_dtype not in (torch.bfloat16, torch.float16):
            return False, f"needs bf16 or fp16 activations (got {config.act_dtype})"
        if not _has_c_op("cpu_gemm_wna16"):
            return False, "torch.ops._C.cpu_gemm_wna16 is not loaded (needs vLLM-CPU's C extension)"
        return True, None

    def prepare(self, weight_packed, weight_scale, weight_zero_point):
        cfg = self.config
        n, k = cfg.out_features, cfg.in_features
        codes, zeros = _codes_and_zeros(weight_packed, weight_scale, weight_zero_point, cfg)
        q = pack_rows(codes.t().contiguous(), 4)  # [K, N/8], packed along N
        q = (
            q.view(k, n // 16, 2).permute(1, 0, 2).reshape(n // 16, 2 * k).contiguous()
        )  # [N/16, 2K]
        tensors = {
            "q_weight": q,
            "scales": weight_scale.t().contiguous().to(cfg.act_dtype),
        }  # [G, N]
        if not (cfg.bits == 4 and cfg.symmetric):  # the kernel assumes zero point 8 without zeros
            tensors["zeros"] = pack_rows(zeros.t().contiguous(), 4)  # [G, N/8]
        self.isa = isa_hint(cfg.act_dtype)
        return tensors

    def apply(
        self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, bias=None
    ) -> torch.Tensor:
        op = torch.ops.vlmptq.cpu_wna16_gemm if torch.compiler.is_compiling() else _cpu_wna16_gemm
        return op(x, tensors["q_weight"], tensors["scales"], tensors.get("zeros"), bias, self.isa)


# ------------------------------------------------------------------------ cpu_w4a8 (int8 acts)


def _cpu_w4a8_gemm(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # [M, K]
    out = torch.ops._C.int4_scaled_mm_cpu(x2.contiguous(), q_weight, zeros, scales, bias)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out_features)


def _cpu_w4a8_gemm_fake(x, q_weight, zeros, scales, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


cpu_w4a8_gemm = register_op("cpu_w4a8_gemm", _cpu_w4a8_gemm, _cpu_w4a8_gemm_fake, "CPU")


def w4a8_enabled() -> bool:
    """vLLM-CPU's own switch (default on); we follow it so both paths compute the same thing."""
    return bool(int(os.environ.get("VLLM_CPU_INT4_W4A8", "1")))


class CpuW4A8Kernel(WNA16Kernel):
    """vLLM-CPU's ``int4_scaled_mm_cpu``: weights as in ``cpu_wna16``, activations quantized to
    int8 per token inside the kernel (AMX). Faster at decode batch sizes; adds activation rounding
    error (~1e-2 relative per GEMM), exactly as stock vLLM-CPU does for its 4-bit checkpoints."""

    name = "cpu_w4a8"

    @classmethod
    def can_implement(cls, config: WNA16LayerConfig) -> tuple[bool, str | None]:
        ok, why = _check_cpu_4bit(config)
        if not ok:
            return ok, why
        if not w4a8_enabled():
            return False, "VLLM_CPU_INT4_W4A8=0 (vLLM-CPU's switch for int8-activation int4 GEMMs)"
        if config.act_dtype != torch.bfloat16:
            return False, f"needs bf16 activations (got {config.act_dtype})"
        g = config.group_size
        if not (128 % g == 0 or g % 128 == 0):  # the kernel walks K in blocks of 128
            return False, f"group_size {g} must divide 128 or be a multiple of it"
        if not torch.cpu._is_amx_tile_supported():
            return False, "needs a CPU with AMX tiles"
        if not (_has_c_op("int4_scaled_mm_cpu") and _has_c_op("convert_weight_packed_scale_zp")):
            return (
                False,
                "torch.ops._C.int4_scaled_mm_cpu is not loaded (needs vLLM-CPU's C extension)",
            )
        return True, None

    def prepare(self, weight_packed, weight_scale, weight_zero_point):
        cfg = self.config
        n, k = cfg.out_features, cfg.in_features
        codes, zeros = _codes_and_zeros(weight_packed, weight_scale, weight_zero_point, cfg)
        order = list(_AWQ_ORDER)
        codes = codes.t().reshape(k, n // 8, 8)[:, :, order].reshape(k, n)  # [K, N]
        zeros = zeros.t().reshape(-1, n // 8, 8)[:, :, order].reshape(-1, n)  # [G, N]
        w, z, s = torch.ops._C.convert_weight_packed_scale_zp(
            pack_rows(codes, 4),
            pack_rows(zeros, 4),
            weight_scale.t().contiguous().to(cfg.act_dtype),
            _AWQ,
        )
        return {"q_weight": w, "zeros": z, "scales": s}

    def apply(
        self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, bias=None
    ) -> torch.Tensor:
        if bias is not None:
            bias = (
                bias.float()
            )  # the int8 kernel adds an fp32 bias (as vLLM's CPUWNA16 converts it)
        op = torch.ops.vlmptq.cpu_w4a8_gemm if torch.compiler.is_compiling() else _cpu_w4a8_gemm
        return op(
            x,
            tensors["q_weight"],
            tensors["zeros"],
            tensors["scales"],
            bias,
            self.config.out_features,
        )
