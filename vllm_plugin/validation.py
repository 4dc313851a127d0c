"""Checks on checkpoint tensors and tensor-parallel partitions, with errors that say what to fix.

Pure functions of shapes and schemes (no vLLM import), so they are tested directly, including the
tensor-parallel sizes this 2-core machine cannot run.

Checkpoint tensors of one linear (or one shard of a fused qkv / gate_up), ``N`` rows, ``K`` inputs:
    weight_packed      int32 [N, ceil(K*b/32)]      (3 bit also [N, ceil(K/10)]: old padded layout)
    weight_scale       float [N, K/g]               (per-channel: [N, 1])
    weight_zero_point  int32 [ceil(N*b/32), K/g]    (3 bit also [ceil(N/10), K/g]); asymmetric only
    weight_shape       int64 [2] = (N, K)
A tensor-parallel partition must hold whole groups along K and whole int32 words of every packed
dimension it cuts, otherwise a rank would need half a word or half a group's scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vlmptq.checkpoint.packing import dense_width, padded3_width
from vlmptq.errors import CheckpointError, ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)


class PartitionError(ConfigError):
    """A layer cannot be split across tensor-parallel ranks at this scheme."""


@dataclass(frozen=True)
class ServingScheme:
    """The weight scheme as the server needs it (any positive group size that divides K)."""

    bits: int
    group_size: int  # -1: one scale per output channel
    symmetric: bool

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(
                f"num_bits={self.bits} is not supported by the vlmptq plugin; it serves "
                f"{SUPPORTED_BITS}. "
                f"Re-quantize the model at one of those widths."
            )
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(
                f"group_size={self.group_size} is invalid; use a positive size or -1 (per channel)."
            )

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


def check_group_divides(layer: str, scheme: ServingScheme, in_features: int) -> None:
    """The layer's K must be a whole number of groups."""
    if scheme.group_size != -1 and in_features % scheme.group_size:
        raise ConfigError(
            f"{layer}: in_features={in_features} is not divisible by "
            f"group_size={scheme.group_size} "
            f"({scheme.describe()}); this checkpoint cannot describe that layer. Re-quantize with "
            "a group "
            f"size that divides {in_features}, or list the layer in `ignore`."
        )


def validate_partition(
    layer: str,
    scheme: ServingScheme,
    input_size: int,
    input_size_per_partition: int,
    output_partition_sizes: Sequence[int],
    tp_size: int,
) -> None:
    """Raise :class:`PartitionError` if this rank's partition cuts a group or a packed int32 word.

    ``output_partition_sizes`` are this rank's rows of each fused shard (q, k, v or gate, up).
    Row-parallel layers split K: each rank needs whole groups and whole words of ``weight_packed``.
    Column-parallel layers split N: asymmetric schemes pack zero points along N, so the rows each
    shard has on a rank must fill whole words (the fused concatenation too, even at TP=1).
    """
    check_group_divides(layer, scheme, input_size)
    b = scheme.bits
    fix = (
        "serve with a tensor-parallel size whose shards keep whole groups and whole 32-bit words "
        "(or re-quantize with a smaller group size)"
    )
    if input_size_per_partition != input_size:  # row parallel
        k = input_size_per_partition
        if scheme.group_size != -1 and k % scheme.group_size:
            raise PartitionError(
                f"{layer}: tensor-parallel size {tp_size} gives each rank {k} of {input_size} "
                "input columns, "
                f"which is not a whole number of groups of {scheme.group_size} "
                f"({scheme.describe()}); {fix}."
            )
        if (k * b) % 32:
            raise PartitionError(
                f"{layer}: tensor-parallel size {tp_size} gives each rank {k} input columns = "
                f"{k * b} bits "
                "per row of weight_packed, not a whole number of int32 words "
                f"({scheme.describe()}); {fix}."
            )
    if not scheme.symmetric:
        for i, n in enumerate(output_partition_sizes):
            if (n * b) % 32:
                what = (
                    f"tensor-parallel size {tp_size} gives each rank {n} rows"
                    if tp_size > 1
                    else f"has {n} rows"
                )
                shard = f" (fused shard {i})" if len(output_partition_sizes) > 1 else ""
                raise PartitionError(
                    f"{layer}{shard}: {what} = {n * b} bits per column of weight_zero_point, not "
                    "a whole "
                    f"number of int32 words ({scheme.describe()}); zero points are packed along "
                    "the output "
                    f"dimension, so each shard needs a multiple of {32 // math.gcd(32, b)} rows; "
                    f"{fix}."
                )


def expected_shapes(
    scheme: ServingScheme, rows: int | None, in_features: int, padded3: bool = False
) -> dict:
    """Checkpoint shape of each tensor for ``rows`` outputs (None: unknown, dim 0 unchecked)."""
    b, glen = scheme.bits, scheme.group_len(in_features)
    groups = in_features // glen
    width = padded3_width(in_features) if padded3 else dense_width(in_features, b)
    zrows = None if rows is None else (padded3_width(rows) if padded3 else dense_width(rows, b))
    shapes = {"weight_packed": (rows, width), "weight_scale": (rows, groups), "weight_shape": (2,)}
    if not scheme.symmetric:
        shapes["weight_zero_point"] = (zrows, groups)
    return shapes


def _matches(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected, strict=True)
    )


def check_tensor(
    tensor_name: str,
    param: str,
    shape: Sequence[int],
    scheme: ServingScheme,
    rows: int | None,
    in_features: int,
) -> bool:
    """Validate one checkpoint tensor's shape; True when it is in the old padded 3-bit layout.

    Raises :class:`CheckpointError` naming the tensor, its shape and the shape(s) expected.
    """
    shape = tuple(int(s) for s in shape)
    dense = expected_shapes(scheme, rows, in_features)
    if param not in dense:
        raise CheckpointError(
            f"{tensor_name}: unexpected tensor for a {scheme.describe()} layer (expected "
            f"{sorted(dense)}). Is the checkpoint's scheme (symmetric?) the one config.json "
            "declares?"
        )
    if _matches(shape, dense[param]):
        return False
    if scheme.bits == 3 and param in ("weight_packed", "weight_zero_point"):
        padded = expected_shapes(scheme, rows, in_features, padded3=True)[param]
        if _matches(shape, padded):
            return True
    fmt = lambda s: "(" + ", ".join("?" if d is None else str(d) for d in s) + ")"  # noqa: E731
    want = fmt(dense[param])
    if scheme.bits == 3 and param in ("weight_packed", "weight_zero_point"):
        padded = expected_shapes(scheme, rows, in_features, padded3=True)[param]
        want += f" (dense) or {fmt(padded)} (10 per word)"
    what = {
        "weight_packed": f"{in_features} inputs x {scheme.bits} bits packed in int32 words per row",
        "weight_scale": f"one scale per {scheme.group_len(in_features)} inputs",
        "weight_zero_point": f"{scheme.bits}-bit zero points packed along the {rows} outputs",
        "weight_shape": "(out_features, in_features)",
    }[param]
    raise CheckpointError(
        f"{tensor_name}: shape {fmt(shape)} does not match {scheme.describe()} for a layer with "
        f"{rows if rows is not None else '?'} outputs and {in_features} inputs: expected {want} "
        f"({what}). The checkpoint was written for another scheme or layer size; re-export it."
    )
