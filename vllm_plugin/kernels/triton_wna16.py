"""Triton W2/W3/W4 A16 GEMM kernel for vlmptq checkpoints (group-wise, symmetric or asymmetric).

Checkpoint layout handed to :meth:`TritonWNA16Kernel.prepare` (see :mod:`vllm_plugin.kernels.base`):
    weight_packed      int32 [N, ceil(K*b/32)]   codes packed along K, little end first (3-bit dense)
    weight_scale       act dtype [N, K/g]
    weight_zero_point  int32 [ceil(N*b/32), K/g] packed along N; None for symmetric (z = 2^(b-1))

Kernel layout (what ``prepare`` returns; details in :mod:`vllm_plugin.kernels.triton.layout`):
    qweight  int32 [PLANES, N, U]  "lane-paired units". A unit is one word (b = 2: 16 codes, b = 4:
             8 codes) or three words, one per plane (b = 3: 32 codes in 96 bits). A word is two
             16-bit lanes; the fields at one position of both lanes are neighbouring columns, so
             one mask-and-or makes a packed pair of 16-bit floats. K is cut into blocks of 16 units
             (128 / 256 / 512 columns for b = 4 / 2 / 3, zero-padded) and each block into 32-column
             tiles: field position t of unit j, lane l is column 32*t + 2*j + l of the block.
    sz       int32 [K_pad/ge, N]   per (effective group, channel): scale in the low half and zero
             point in the high half, both act-dtype bit patterns; group-major. ``ge`` = 32, 64 or
             128 columns (per-channel scales are repeated per 128-column piece).
    locks    int32 [65536]         stream-K tile counters, shared by all layers of a device, always 0
             between launches.

Dispatch by M (tuned per GPU in ``vllm_plugin/kernels/configs/*.json``, defaults otherwise):
``gemv`` (M = 1 on sm_90: fused dequant on the CUDA cores, K split), ``dot`` (fused dequant + tensor cores
up to 256 rows; persistent, stream-K over tiles x K blocks), ``dequant`` (prefill: dequantize to act dtype,
then cuBLAS; on sm_90 from 129 rows at W2 / W3). See ``configs.default_config``.
See docs/kernels.md.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping

import torch

from vllm_plugin.kernels.base import WNA16Kernel, WNA16LayerConfig
from vllm_plugin.kernels.triton import ops as _ops  # registers torch.ops.vlmptq.wna16_gemm (no triton import)
from vllm_plugin.kernels.triton.layout import TILE
from vllm_plugin.kernels.triton.selfcheck import SELF_CHECK_ENV, self_check, self_check_enabled

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def triton_verdict(kernel: str, config: WNA16LayerConfig, reasons: list[str]) -> tuple[bool, str | None]:
    """``can_implement`` of a Triton kernel (``kernel``: its name in the selection list): the
    kernel-specific ``reasons`` plus what every Triton kernel here needs (:func:`triton_reasons`), then,
    once per scheme and device, its first-use self-check against the reference."""
    reasons = list(reasons) + triton_reasons(config)
    if reasons:
        return False, "; ".join(reasons)
    g = config.group_size
    if self_check_enabled():  # once per scheme and device: the kernel must match the reference here
        failed = self_check(config.bits, None if g == config.in_features else g, config.act_dtype,
                            torch.cuda.current_device(), kernel)
        if failed:
            return False, f"failed its self-check on this GPU ({failed}; {SELF_CHECK_ENV}=0 skips the check)"
    return True, None


def triton_reasons(config: WNA16LayerConfig) -> list[str]:
    """Why no Triton kernel here can take ``config`` (empty: they can): bf16/fp16 activations, groups that
    are multiples of 32 or per-channel, an sm80+ CUDA GPU, triton installed."""
    reasons = []
    if config.act_dtype not in SUPPORTED_DTYPES:
        reasons.append(f"activation dtype {config.act_dtype} (takes bfloat16, float16)")
    g, k = config.group_size, config.in_features
    if g <= 0 or k % g:
        reasons.append(f"group size {g} does not divide in_features {k}")
    elif g < k and g % TILE:
        reasons.append(f"group size {g} is not a multiple of {TILE} (nor per-channel)")
    if config.device_type != "cuda":
        reasons.append(f"needs a CUDA device, the layer is on {config.device_type!r}")
    elif not torch.cuda.is_available():
        reasons.append("torch sees no CUDA device")
    else:
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            reasons.append(f"needs compute capability >= 8.0 (bf16 tensor cores), GPU has {major}.{minor}")
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    return reasons


class TritonWNA16Kernel(WNA16Kernel):
    """Fused dequant + GEMM in Triton for 2/3/4-bit group-quantized weights on CUDA GPUs."""

    name = "triton"

    @classmethod
    def can_implement(cls, config: WNA16LayerConfig) -> tuple[bool, str | None]:
        reasons = [] if config.bits in SUPPORTED_BITS else [f"{config.bits}-bit weights (takes {SUPPORTED_BITS})"]
        if config.out_features <= 0 or config.in_features <= 0:
            reasons.append(f"empty partition ({config.out_features} x {config.in_features})")
        return triton_verdict(cls.name, config, reasons)

    def prepare(
        self,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        from vllm_plugin.kernels.triton.layout import repack

        c = self.config
        expected = (c.out_features, c.num_groups)
        if tuple(weight_scale.shape) != expected:
            raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected {expected} "
                             f"(out_features, in_features // group_size)")
        qweight, sz, ge = repack(weight_packed, weight_scale, weight_zero_point, c.bits, c.in_features,
                                 c.act_dtype)
        logger.debug("triton wna16: repacked %dx%d w%d g%d (effective group %d)", c.out_features,
                     c.in_features, c.bits, c.group_size, ge)
        return {"qweight": qweight, "sz": sz, "locks": _ops.get_locks(qweight.device)}

    def apply(
        self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.config
        if x.dtype != c.act_dtype:
            raise TypeError(f"activations are {x.dtype} but the layer was prepared for {c.act_dtype}")
        lead = x.shape[:-1]
        out = torch.ops.vlmptq.wna16_gemm(x.reshape(-1, c.in_features), tensors["qweight"], tensors["sz"],
                                          bias, tensors["locks"], c.bits, c.out_features)
        return out.view(*lead, c.out_features)
