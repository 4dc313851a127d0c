"""The solver's output for one linear layer.

Layout (all on the same device):
    codes  uint8 [N, K]   unsigned codes in [0, 2^bits - 1], K in the layer's original column order
    scale  [N, G]         float, the model dtype (bf16/fp16/fp32); G = K // group_size (1 per channel)
    zero   uint8 [N, G]   unsigned zero points in [0, 2^bits - 1]; for symmetric schemes all 2^(bits-1)
Dequantization: W[n, k] = (codes[n, k] - zero[n, k // g]) * scale[n, k // g], computed in fp32 and
rounded once to the scale's dtype (bit-identical to compressed-tensors' dequantize in that dtype).

Storage: the codes are held either as the uint8 matrix above (what solvers produce) or, after
:meth:`QuantizedWeight.pack`, as the checkpoint's own packed rows (``vlmptq.checkpoint.packing``:
int32 [N, ceil(K*b/32)], b bits per code instead of 8). The pipeline keeps every finished linear
packed until the checkpoint is written: unpacked, a 72B model's codes alone would hold 70 GB of host
memory (W3: 26 GB packed), and the writer then stores the packed rows as they are. ``codes``
unpacks on access in either case.
"""

from __future__ import annotations

import torch

from vlmptq.checkpoint.packing import dense_width, pack_rows, unpack_rows
from vlmptq.quant.scheme import WeightScheme


class QuantizedWeight:
    """Codes, scales and zero points of one quantized linear (module docstring for the layouts)."""

    __slots__ = ("_codes", "_packed", "in_features", "scale", "zero", "scheme")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme):
        self._codes: torch.Tensor | None = codes
        self._packed: torch.Tensor | None = None
        self.in_features = int(codes.shape[1])
        self.scale, self.zero, self.scheme = scale, zero, scheme
        self._check_shapes(int(codes.shape[0]))

    @classmethod
    def from_packed(cls, packed: torch.Tensor, in_features: int, scale: torch.Tensor, zero: torch.Tensor,
                    scheme: WeightScheme) -> "QuantizedWeight":
        """A packed weight from the checkpoint's dense rows ``[N, ceil(K*b/32)]`` (K = ``in_features``)."""
        if packed.dim() != 2 or packed.dtype != torch.int32 or packed.shape[1] != dense_width(in_features,
                                                                                            scheme.bits):
            raise ValueError(f"packed codes {tuple(packed.shape)} {packed.dtype} are not {in_features} "
                             f"{scheme.bits}-bit codes per row as dense int32 words")
        self = cls.__new__(cls)
        self._codes, self._packed, self.in_features = None, packed, int(in_features)
        self.scale, self.zero, self.scheme = scale, zero, scheme
        self._check_shapes(int(packed.shape[0]))
        return self

    def _check_shapes(self, n: int) -> None:
        g = self.scheme.groups(self.in_features)
        if tuple(self.scale.shape) != (n, g) or tuple(self.zero.shape) != (n, g):
            raise ValueError(
                f"scale {tuple(self.scale.shape)} / zero {tuple(self.zero.shape)} must be ({n}, {g}) "
                f"for codes {(n, self.in_features)} and {self.scheme.describe()}"
            )

    @property
    def codes(self) -> torch.Tensor:
        """uint8 ``[N, K]`` (unpacked on each access of a packed weight)."""
        if self._codes is not None:
            return self._codes
        return unpack_rows(self._packed, self.scheme.bits, self.in_features)

    @property
    def is_packed(self) -> bool:
        return self._codes is None

    def packed_rows(self) -> torch.Tensor:
        """The codes as the checkpoint's dense int32 rows (packed now if held unpacked)."""
        if self._packed is not None:
            return self._packed
        return pack_rows(self._codes, self.scheme.bits)  # ValueError for codes outside the grid

    def pack(self) -> "QuantizedWeight":
        """The same weight with its codes held packed (itself if they already are)."""
        if self._packed is not None:
            return self
        return QuantizedWeight.from_packed(self.packed_rows(), self.in_features, self.scale, self.zero, self.scheme)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        if self._packed is not None:
            return QuantizedWeight.from_packed(self._packed.to(device), self.in_features, self.scale.to(device),
                                               self.zero.to(device), self.scheme)
        return QuantizedWeight(self._codes.to(device), self.scale.to(device), self.zero.to(device), self.scheme)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.scale.shape[0]), self.in_features)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.shape[0]}x{self.in_features}, {self.scheme.describe()}, "
                f"{'packed' if self.is_packed else 'unpacked'}, {self.scale.device})")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[N, K]`` in ``dtype`` (default: the scale's dtype)."""
        dtype = dtype or self.scale.dtype
        glen = self.scheme.group_len(self.in_features)
        z = self.zero.to(torch.float32).repeat_interleave(glen, dim=1)
        s = self.scale.to(torch.float32).repeat_interleave(glen, dim=1)
        w = (self.codes.to(torch.float32) - z) * s
        return w.to(self.scale.dtype).to(dtype)
