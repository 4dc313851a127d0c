"""One quantized linear <-> its compressed-tensors ``pack-quantized`` checkpoint tensors.

Checkpoint layout of a linear with weight ``[N, K]`` (``b`` bits, ``G`` groups along K):
    <module>.weight_packed      int32 [N, ceil(K*b/32)]   codes packed along K, dense bitstream
                                                          (3-bit: also reads the padded
                                                          10-per-word layout, width ceil(K/10))
    <module>.weight_scale       float [N, G]              the model dtype
    <module>.weight_zero_point  int32 [ceil(N*b/32), G]   asymmetric only; packed along N
    <module>.weight_shape       int64 [2]                 (N, K)
Codes and zero points are unsigned (``signed + 2^(b-1)``); ``W = (q - z) * s``. Bit order and the
two 3-bit layouts are described in :mod:`vlmptq.checkpoint.packing`.

``compress_weight`` is the writer's half; ``check_layer_tensors`` validates names, dtypes and shapes
(working on shapes alone, so ``inspect`` need not read the data) and ``decompress_weight`` is the
reader's half. Every error names the tensor, what was found and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vlmptq.checkpoint.packing import (
    dense_width,
    pack_columns,
    padded3_width,
    unpack_columns,
    unpack_rows_any,
)
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme

PACKED = "weight_packed"
SCALE = "weight_scale"
ZERO = "weight_zero_point"
SHAPE = "weight_shape"
SUFFIXES = (PACKED, SCALE, ZERO, SHAPE)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_SHAPE_DTYPES = (torch.int64, torch.int32)


def local_names(scheme: WeightScheme) -> tuple[str, ...]:
    """Local tensor names of one quantized module under ``scheme``."""
    return (PACKED, SCALE, SHAPE) if scheme.symmetric else (PACKED, SCALE, ZERO, SHAPE)


def compress_weight(qw: QuantizedWeight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Local checkpoint tensors (``weight_packed``, ``weight_scale``, [``weight_zero_point``],
    ``weight_shape``) of one quantized linear, on the CPU.

    ``scale_dtype`` (default: the scale's own dtype) is the model dtype the scales are stored in; the
    cast must be exact, because the codes were chosen for the scales as they are.
    """
    scheme = qw.scheme
    n, k = qw.shape
    zero = qw.zero.detach().cpu()
    try:
        packed = qw.to("cpu").packed_rows()  # held packed (the pipeline's) or packed here, range checked
    except ValueError as e:
        raise CheckpointError(f"{e}; the solver produced out-of-range values.") from None
    scale = qw.scale.detach().cpu()
    if scale_dtype is not None and scale.dtype != scale_dtype:
        cast = scale.to(scale_dtype)
        if not torch.equal(cast.to(scale.dtype), scale):
            raise CheckpointError(
                f"scales are {scale.dtype} but the model stores {scale_dtype} and the conversion is "
                f"not exact; quantize with scale_dtype={scale_dtype} so codes match the stored scales."
            )
        scale = cast
    out = {
        PACKED: packed,
        SCALE: scale.contiguous(),
        SHAPE: torch.tensor([n, k], dtype=torch.int64),
    }
    if not scheme.symmetric:
        try:
            out[ZERO] = pack_columns(zero, scheme.bits, "zero points")
        except ValueError as e:
            raise CheckpointError(f"{e}; the solver produced out-of-range values.") from None
    elif not bool((zero == scheme.offset).all()):
        raise CheckpointError(
            f"symmetric {scheme.describe()} needs every zero point at {scheme.offset}, found others; "
            f"use an asymmetric scheme or fix the solver's zero points."
        )
    return out


def packed_nbytes(out_features: int, in_features: int, scheme: WeightScheme, scale_itemsize: int) -> int:
    """Bytes :func:`compress_weight` writes for an ``[out_features, in_features]`` linear (without
    packing anything): the size a run will produce, for planning."""
    from vlmptq.checkpoint.packing import dense_width

    n, k, b = out_features, in_features, scheme.bits
    g = scheme.groups(k)
    nbytes = 4 * n * dense_width(k, b) + n * g * scale_itemsize + 2 * 8  # packed codes, scales, shape
    if not scheme.symmetric:
        nbytes += 4 * dense_width(n, b) * g  # zero points packed along N
    return nbytes


@dataclass(frozen=True)
class LayerLayout:
    """What :func:`check_layer_tensors` found for one module."""

    name: str
    out_features: int
    in_features: int
    groups: int
    padded3: bool  # weights stored in compressed-tensors <= 0.17's 10-values-per-word 3-bit layout


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_layer_tensors(
    module: str,
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    weight_shape: torch.Tensor | None,
    scheme: WeightScheme,
) -> LayerLayout:
    """Validate one module's checkpoint tensors from their shapes and dtypes.

    ``shapes`` maps local names (``weight_packed``, ...) to ``(shape, dtype)``; ``weight_shape`` is the
    (tiny) ``weight_shape`` tensor's value. Raises :class:`CheckpointError` naming the offending
    tensor, what it holds (or that it is missing) and the dtype and shape expected.
    """
    def name(s: str) -> str:
        return f"{module}.{s}"

    def found(s: str) -> str:
        if s not in shapes:
            return "missing"
        shape, dtype = shapes[s]
        return f"{str(dtype).removeprefix('torch.')} {_fmt(shape)}"

    for s in shapes:
        if s not in SUFFIXES:
            raise CheckpointError(
                f"checkpoint tensor {name(s)!r} is not supported in a pack-quantized layer "
                f"(expected only {', '.join(local_names(scheme))}; "
                f"activation-order g_idx is not supported)."
            )
    if scheme.symmetric and ZERO in shapes:
        raise CheckpointError(
            f"checkpoint tensor {name(ZERO)!r} is present but config.json declares a symmetric scheme "
            f"({scheme.describe()}), which stores no zero points; fix config_groups or drop the tensor."
        )

    shape_ok = SHAPE in shapes and shapes[SHAPE][1] in INT_SHAPE_DTYPES and tuple(shapes[SHAPE][0]) == (2,)
    if not shape_ok or weight_shape is None:
        raise CheckpointError(
            f"checkpoint tensor {name(SHAPE)!r} is {found(SHAPE)}; expected int64 [2] holding "
            f"(out_features, in_features)."
        )
    n, k = (int(v) for v in weight_shape.tolist())
    if n <= 0 or k <= 0:
        raise CheckpointError(f"checkpoint tensor {name(SHAPE)!r} holds ({n}, {k}); expected positive sizes.")
    try:
        g = scheme.groups(k)
    except ConfigError as e:
        raise CheckpointError(
            f"layer {module!r} (weight {n} x {k}) does not fit the checkpoint's scheme: {e}"
        ) from e

    b = scheme.bits
    widths = [dense_width(k, b)] + ([padded3_width(k)] if b == 3 else [])
    want = f"int32 [{n}, {widths[0]}]" + (f" (or [{n}, {widths[1]}], 10 values per word)" if b == 3 else "")
    packed = shapes.get(PACKED)
    if packed is None or packed[1] != torch.int32 or len(packed[0]) != 2 or packed[0][0] != n \
            or packed[0][1] not in widths:
        raise CheckpointError(
            f"checkpoint tensor {name(PACKED)!r} is {found(PACKED)}; expected {want} "
            f"for a {n} x {k} weight at {b} bits packed along in_features."
        )
    padded3 = b == 3 and packed[0][1] != widths[0]

    scale = shapes.get(SCALE)
    if scale is None or scale[1] not in FLOAT_DTYPES or tuple(scale[0]) != (n, g):
        raise CheckpointError(
            f"checkpoint tensor {name(SCALE)!r} is {found(SCALE)}; expected float16/bfloat16/float32 "
            f"[{n}, {g}] (one scale per output row and group of {scheme.group_len(k)} inputs)."
        )

    if not scheme.symmetric:
        zwidths = [dense_width(n, b)] + ([padded3_width(n)] if b == 3 else [])
        zwant = f"int32 [{zwidths[0]}, {g}]"
        if b == 3:
            zwant += f" (or [{zwidths[1]}, {g}], 10 values per word)"
        zp = shapes.get(ZERO)
        if zp is None or zp[1] != torch.int32 or len(zp[0]) != 2 or zp[0][0] not in zwidths or zp[0][1] != g:
            raise CheckpointError(
                f"checkpoint tensor {name(ZERO)!r} is {found(ZERO)}; expected {zwant} "
                f"({n} zero points of {b} bits packed along out_features, {g} groups)."
            )
    return LayerLayout(name=module, out_features=n, in_features=k, groups=g, padded3=padded3)


def decompress_weight(
    module: str, tensors: Mapping[str, torch.Tensor], scheme: WeightScheme
) -> QuantizedWeight:
    """Validate and unpack one module's local checkpoint tensors into a :class:`QuantizedWeight`."""
    shapes = {s: (tuple(t.shape), t.dtype) for s, t in tensors.items()}
    layout = check_layer_tensors(module, shapes, tensors.get(SHAPE), scheme)
    n, k = layout.out_features, layout.in_features
    codes = unpack_rows_any(tensors[PACKED], scheme.bits, k)
    if scheme.symmetric:
        zero = torch.full((n, layout.groups), scheme.offset, dtype=torch.uint8)
    else:
        zero = unpack_columns(tensors[ZERO], scheme.bits, n)
    return QuantizedWeight(codes=codes, scale=tensors[SCALE], zero=zero, scheme=scheme)
