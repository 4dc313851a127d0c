"""Bit packing of unsigned integer codes into int32 words (compressed-tensors ``pack-quantized``).

Layouts (rows are packed independently; ``C`` values per row, ``b`` bits per value):

dense (what we write; compressed-tensors >= 0.18 and vLLM 0.32/0.33 for every bit width):
    the row is a little-endian bitstream of int32 words; value ``i`` occupies stream bits
    ``[i*b, (i+1)*b)`` and may straddle two words (b = 3). Width ``ceil(C*b/32)`` words.
    For b in {2, 4, 8} this is exactly compressed-tensors' ``pack_to_int32``: ``32/b`` values per
    word, value ``j`` of a word at bit ``j*b``.
padded3 (compressed-tensors <= 0.17 for 3 bits, read-only): ``floor(32/3) = 10`` values per word at
    bits ``[3j, 3j+3)``, the top 2 bits unused. Width ``ceil(C/10)`` words.

Codes are unsigned (``signed + 2^(b-1)``); padding values are 0. Weights are packed along K
(``weight_packed [N, ceil(K*b/32)]``), zero points along N (pack the transpose, then transpose back:
``weight_zero_point [ceil(N*b/32), G]``).
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def dense_width(cols: int, bits: int) -> int:
    """int32 words per row in the dense layout."""
    return math.ceil(cols * bits / 32)


def padded3_width(cols: int) -> int:
    """int32 words per row in compressed-tensors <= 0.17's 3-bit layout (10 values per word)."""
    return math.ceil(cols / 10)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


CHUNK_VALUES = 1 << 24  # values per block of rows: bounds the int64 working copies to ~128 MiB each


def _row_chunks(rows: int, cols: int) -> list[slice]:
    step = max(1, CHUNK_VALUES // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def check_code_range(values: torch.Tensor, bits: int, what: str = "codes") -> None:
    """ValueError unless every value lies in [0, 2^bits - 1] (packing one outside would corrupt its
    neighbours in the word)."""
    maxq = (1 << bits) - 1
    bad = values > maxq  # (comparisons are much cheaper than min/max reductions on uint8)
    if values.dtype != torch.uint8:
        bad |= values < 0
    if bool(bad.any()):
        raise ValueError(f"{what} span [{int(values.min())}, {int(values.max())}] but {bits}-bit codes must lie "
                         f"in [0, {maxq}]")


def pack_rows(codes: torch.Tensor, bits: int, what: str = "codes") -> torch.Tensor:
    """Pack unsigned codes ``[R, C]`` (any integer dtype, values < 2^bits, else ValueError naming ``what``)
    into dense int32 ``[R, W]`` (in blocks of rows: a 152k-row LM head does not need 8 bytes per code of
    working memory)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, cols], got shape {tuple(codes.shape)}")
    check_code_range(codes, bits, what)
    return torch.cat([_pack_block(codes[rows], bits) for rows in _row_chunks(*codes.shape)])


def _pack_block(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = codes.shape
    width = dense_width(cols, bits)
    padded = math.ceil(cols / 32) * 32  # 32 values fill exactly `bits` words
    v = codes.to(torch.int64)
    if padded != cols:
        v = torch.nn.functional.pad(v, (0, padded - cols))
    v = v.view(rows, padded // 32, 32)  # [R, blocks, 32 values]
    out = torch.zeros(rows, padded // 32, bits, dtype=torch.int64, device=codes.device)
    for i in range(32):
        start = i * bits
        word, off = divmod(start, 32)
        out[:, :, word] |= (v[:, :, i] << off) & _MASK32
        if off + bits > 32:  # straddles into the next word
            out[:, :, word + 1] |= v[:, :, i] >> (32 - off)
    return _to_int32(out.view(rows, (padded // 32) * bits)[:, :width]).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: dense int32 ``[R, W]`` -> unsigned uint8 codes ``[R, cols]``."""
    rows, width = packed.shape
    if width != dense_width(cols, bits):
        raise ValueError(
            f"packed width {width} does not match {cols} values of {bits} bits "
            f"(expected {dense_width(cols, bits)} words)"
        )
    return torch.cat([_unpack_block(packed[r], bits, cols) for r in _row_chunks(rows, cols)])


def _unpack_block(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows, width = packed.shape
    blocks = math.ceil(cols / 32)
    w = packed.to(torch.int64) & _MASK32
    if blocks * bits != width:
        w = torch.nn.functional.pad(w, (0, blocks * bits - width))
    w = w.view(rows, blocks, bits)
    out = torch.empty(rows, blocks, 32, dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for i in range(32):
        word, off = divmod(i * bits, 32)
        v = w[:, :, word] >> off
        if off + bits > 32:
            v = v | (w[:, :, word + 1] << (32 - off))
        out[:, :, i] = v & mask
    return out.view(rows, blocks * 32)[:, :cols].to(torch.uint8)


def unpack_rows_padded3(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """compressed-tensors <= 0.17 3-bit layout ``[R, ceil(C/10)]`` -> uint8 codes ``[R, cols]``."""
    rows, width = packed.shape
    if width != padded3_width(cols):
        raise ValueError(f"packed width {width} does not match the padded 3-bit layout of {cols} values")
    w = packed.to(torch.int64) & _MASK32
    shifts = torch.arange(10, device=packed.device, dtype=torch.int64) * 3
    out = (w.unsqueeze(-1) >> shifts) & 0b111  # [R, W, 10]
    return out.view(rows, -1)[:, :cols].to(torch.uint8)


def unpack_rows_any(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Unpack either layout, telling them apart by the packed width.

    The widths always differ when ``cols`` is a multiple of 32 (every real layer); for other sizes
    they can coincide, and then the dense layout (what vlmptq and compressed-tensors >= 0.18 write)
    is assumed.
    """
    width = packed.shape[-1]
    if width == dense_width(cols, bits):
        return unpack_rows(packed, bits, cols)
    if bits == 3 and width == padded3_width(cols):
        return unpack_rows_padded3(packed, cols)
    expected = f"{dense_width(cols, bits)} (dense)"
    if bits == 3:
        expected += f" or {padded3_width(cols)} (10 values per word)"
    raise ValueError(f"packed width {width} fits neither layout for {cols} values of {bits} bits; expected {expected}")


def pack_columns(codes: torch.Tensor, bits: int, what: str = "codes") -> torch.Tensor:
    """Pack along dim 0 (zero points): ``[N, G]`` -> ``[ceil(N*b/32), G]``."""
    return pack_rows(codes.t().contiguous(), bits, what).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`, accepting either layout: -> uint8 ``[rows, G]``."""
    return unpack_rows_any(packed.t().contiguous(), bits, rows).t().contiguous()
