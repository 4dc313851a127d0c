"""The weight quantization scheme: bits, group size, symmetry.

A thin validated wrapper over compressed-tensors' ``QuantizationArgs`` so that what we validate is
exactly what we serialize into ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmptq.errors import ConfigError

if TYPE_CHECKING:  # imported lazily: the solvers run where compressed-tensors is not installed
    from compressed_tensors.quantization import QuantizationArgs

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)


@dataclass(frozen=True)
class WeightScheme:
    """Integer weight-only quantization of a linear layer's weight ``[N, K]``.

    bits: 2, 3, 4 or 8.
    group_size: number of consecutive input columns sharing one scale/zero; -1 = one per output row.
    symmetric: zero point fixed at 2^(bits-1) (no zero-point tensor in the checkpoint).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}.")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(
                f"group_size={self.group_size!r} is not supported; choose one of "
                f"{SUPPORTED_GROUP_SIZES} (-1 means one scale per output channel)."
            )

    @property
    def maxq(self) -> int:
        """Largest unsigned code, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def offset(self) -> int:
        """Unsigned code of signed zero, 2^(bits-1) (the symmetric zero point)."""
        return 1 << (self.bits - 1)

    def groups(self, in_features: int) -> int:
        """Number of groups along K, after checking the layer can take this group size."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ConfigError(
                f"in_features={in_features} is not divisible by group_size={self.group_size}; "
                f"use a group size that divides it or -1 (per channel)."
            )
        return in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        """Columns per group for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def to_quantization_args(self) -> "QuantizationArgs":
        """The compressed-tensors description of this scheme (what config.json records)."""
        from compressed_tensors.quantization import QuantizationArgs

        strategy = "channel" if self.group_size == -1 else "group"
        return QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy=strategy,
            group_size=None if self.group_size == -1 else self.group_size,
            dynamic=False,
            observer="minmax",
        )

    @classmethod
    def from_quantization_args(cls, args: "QuantizationArgs") -> "WeightScheme":
        """Inverse of :meth:`to_quantization_args` for the int weight-only schemes we support."""
        if str(args.type) not in ("int", "QuantizationType.INT"):
            raise ConfigError(f"only integer weight quantization is supported, got type={args.type}.")
        strategy = str(getattr(args.strategy, "value", args.strategy))
        if strategy == "channel":
            group = -1
        elif strategy == "group":
            group = int(args.group_size)
        else:
            raise ConfigError(f"weight strategy {strategy!r} is not supported; use 'group' or 'channel'.")
        return cls(bits=int(args.num_bits), group_size=group, symmetric=bool(args.symmetric))

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits} {g} {'sym' if self.symmetric else 'asym'}"
