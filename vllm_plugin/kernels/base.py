"""The kernel seam: what every weight-only low-bit GEMM kernel implements.

Checkpoint layout handed to :meth:`WNA16Kernel.prepare` (one tensor-parallel partition, fused
shards such as qkv / gate_up already concatenated along N; 3-bit always in the dense layout, the
linear method converts compressed-tensors <= 0.17's padded layout before calling):
    weight_packed      int32 [N, ceil(K*b/32)]   codes packed along K (vlmptq.checkpoint.packing)
    weight_scale       act dtype [N, G]          G = K // group_size
    weight_zero_point  int32 [ceil(N*b/32), G]   packed along N; None for symmetric schemes
Dequantization: W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g] with unsigned codes; symmetric
schemes use z = 2^(b-1). The kernel may repack into any layout it streams best: it owns the dict it
returns from :meth:`prepare` and documents that layout at the top of its module.

This module and the kernels import torch (and triton) only, never vLLM, so they run on machines
without vLLM (the GPU benchmark machine).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class WNA16LayerConfig:
    """What a kernel needs to know about one linear partition."""

    bits: int
    group_size: int  # columns per group within this partition (== in_features for per-channel)
    symmetric: bool
    in_features: int  # K of this partition
    out_features: int  # N of this partition (fused shards summed)
    act_dtype: torch.dtype
    device_type: str  # "cuda", "cpu", ...

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size


class WNA16Kernel(ABC):
    """A weight-only-quantized linear kernel: ``y = x @ dequant(W).T + bias``."""

    name: ClassVar[str]

    def __init__(self, config: WNA16LayerConfig) -> None:
        self.config = config

    @classmethod
    @abstractmethod
    def can_implement(cls, config: WNA16LayerConfig) -> tuple[bool, str | None]:
        """(True, None) if this kernel can run the layer, else (False, a reason a user can read)."""

    @abstractmethod
    def prepare(
        self,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Convert checkpoint tensors (layout above) into the kernel's own tensors (run once at load)."""

    @abstractmethod
    def apply(
        self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x [..., K]`` (act dtype) -> ``[..., N]``."""
