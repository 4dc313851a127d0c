"""The solver's output for one linear layer, in unpacked form.

Layout (all on the same device):
    codes  uint8 [N, K]   unsigned codes in [0, 2^bits - 1], K in the layer's original column order
    scale  [N, G]         float, the model dtype (bf16/fp16/fp32); G = K // group_size (1 per channel)
    zero   uint8 [N, G]   unsigned zero points in [0, 2^bits - 1]; for symmetric schemes all 2^(bits-1)
Dequantization: W[n, k] = (codes[n, k] - zero[n, k // g]) * scale[n, k // g], computed in fp32 and
rounded once to the scale's dtype (bit-identical to compressed-tensors' dequantize in that dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmptq.quant.scheme import WeightScheme


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: WeightScheme

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        g = self.scheme.groups(k)
        if tuple(self.scale.shape) != (n, g) or tuple(self.zero.shape) != (n, g):
            raise ValueError(
                f"scale {tuple(self.scale.shape)} / zero {tuple(self.zero.shape)} must be ({n}, {g}) "
                f"for codes {tuple(self.codes.shape)} and {self.scheme.describe()}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[N, K]`` in ``dtype`` (default: the scale's dtype)."""
        dtype = dtype or self.scale.dtype
        glen = self.scheme.group_len(self.codes.shape[1])
        z = self.zero.to(torch.float32).repeat_interleave(glen, dim=1)
        s = self.scale.to(torch.float32).repeat_interleave(glen, dim=1)
        w = (self.codes.to(torch.float32) - z) * s
        return w.to(self.scale.dtype).to(dtype)
