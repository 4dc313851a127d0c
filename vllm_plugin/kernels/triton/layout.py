"""Repack compressed-tensors ``pack-quantized`` tensors into the Triton kernels' layout (torch only).

Checkpoint layout (input, see :mod:`vllm_plugin.kernels.base`):
    weight_packed      int32 [N, ceil(K*b/32)]   dense little-end-first bitstream along K
    weight_scale       act dtype [N, K/g]
    weight_zero_point  int32 [ceil(N*b/32), K/g] packed along N (None: symmetric, z = 2^(b-1))

Kernel layout ("K-interleaved units", output of :func:`repack`):
    A *unit* is one int32 word (b = 2: 16 codes, b = 4: 8 codes) or, for b = 3, one word in each of
    three planes (32 codes in 96 bits). ``VPW`` = codes per unit (16 / 32 / 8).
    K is cut into *blocks* of ``SUB * VPW`` values (SUB = 16; 256 / 512 / 128 values for b = 2/3/4)
    and padded with code 0 to a whole number of blocks (``K_pad``). Block ``t`` of a row is ``SUB``
    consecutive units; code ``i`` of unit ``j`` of block ``t`` is the weight of input column
        k = t * SUB * VPW + i * SUB + j          (i < VPW, j < SUB)
    so code slot ``i`` of the 16 units of a block covers 16 *consecutive* columns: a kernel that
    loads one 16-byte vector of units per thread dequantizes slot ``i`` with one mask (no shift for
    most slots) and multiplies it by a contiguous slice of x.
    qweight int32 [PLANES, N, U]   PLANES = 3 for b = 3 else 1; U = K_pad / VPW units per row.
        b = 2, 4: code i at bits [i*b, (i+1)*b) of the word.
        b = 3: plane p holds codes 10p .. 10p+9 at bits [3(i-10p), ...); code 30 = plane 0 bits 30-31
        (low two bits) + plane 2 bit 30 (high bit); code 31 = plane 1 bits 30-31 + plane 2 bit 31.
    sz int32 [K_pad / ge, N]   one word per (effective group, output channel): low half = scale,
        high half = zero point, both as act-dtype bit patterns (the zero point is a small integer,
        exact in bf16/fp16). Groups are stored group-major so a tile of channels is one contiguous
        load. ``ge`` (the effective group) = gcd(g, block values): a group longer than a block (e.g.
        per-channel scales) is repeated per block-aligned piece. Padding groups hold scale 0.
"""

from __future__ import annotations

import math

import torch

from vlmptq.checkpoint.packing import unpack_columns, unpack_rows

SUB = 16  # units per block (= consecutive columns that one code slot covers)
_MASK32 = 0xFFFFFFFF


def codes_per_unit(bits: int) -> int:
    """Codes held by one unit: a word for b = 2/4, three words (one per plane) for b = 3."""
    if bits == 3:
        return 32
    if bits in (2, 4):
        return 32 // bits
    raise ValueError(f"the Triton kernels take 2, 3 or 4-bit weights, got {bits}")


def planes(bits: int) -> int:
    return 3 if bits == 3 else 1


def block_values(bits: int) -> int:
    """Input columns per layout block (128 / 256 / 512 for b = 4 / 2 / 3)."""
    return SUB * codes_per_unit(bits)


def padded_k(in_features: int, bits: int) -> int:
    bk = block_values(bits)
    return math.ceil(in_features / bk) * bk


def effective_group(group_size: int, bits: int) -> int:
    """Group length the kernel sees: divides both the checkpoint group and the layout block."""
    return math.gcd(group_size, block_values(bits))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` -> ``qweight`` int32 ``[PLANES, N, U]`` (layout above)."""
    n, k = codes.shape
    vpw, bk = codes_per_unit(bits), block_values(bits)
    kp = padded_k(k, bits)
    c = codes.to(torch.int64)
    if kp != k:
        c = torch.nn.functional.pad(c, (0, kp - k))
    # [N, blocks, slot i, unit j] -> [N, blocks, unit j, slot i]
    c = c.view(n, kp // bk, vpw, SUB).transpose(2, 3)
    if bits != 3:
        shifts = torch.arange(vpw, device=c.device, dtype=torch.int64) * bits
        words = (c << shifts).sum(-1)  # fields are disjoint: sum == bitwise or
        return _to_int32(words.reshape(1, n, -1)).contiguous()
    shifts = torch.arange(10, device=c.device, dtype=torch.int64) * 3
    out = []
    for p in range(3):
        words = (c[..., 10 * p : 10 * p + 10] << shifts).sum(-1)
        if p < 2:  # low two bits of code 30 (plane 0) / 31 (plane 1)
            words = words | ((c[..., 30 + p] & 3) << 30)
        else:  # high bits of codes 30 and 31
            words = words | (((c[..., 30] >> 2) & 1) << 30) | (((c[..., 31] >> 2) & 1) << 31)
        out.append(_to_int32(words.reshape(n, -1)))
    return torch.stack(out).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[PLANES, N, U]`` -> uint8 codes ``[N, in_features]``."""
    _, n, u = qweight.shape
    vpw, bk = codes_per_unit(bits), block_values(bits)
    w = qweight.to(torch.int64) & _MASK32
    if bits != 3:
        shifts = torch.arange(vpw, device=w.device, dtype=torch.int64) * bits
        c = (w[0].unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [N, U, vpw]
    else:
        shifts = torch.arange(10, device=w.device, dtype=torch.int64) * 3
        parts = [(w[p].unsqueeze(-1) >> shifts) & 7 for p in range(3)]
        c30 = ((w[0] >> 30) & 3) | (((w[2] >> 30) & 1) << 2)
        c31 = ((w[1] >> 30) & 3) | (((w[2] >> 31) & 1) << 2)
        c = torch.cat(parts + [c30.unsqueeze(-1), c31.unsqueeze(-1)], dim=-1)  # [N, U, 32]
    blocks = u // SUB
    c = c.view(n, blocks, SUB, vpw).transpose(2, 3).reshape(n, blocks * bk)
    return c[:, :in_features].to(torch.uint8)


def pack_scale_zero(
    scale: torch.Tensor, zero: torch.Tensor, bits: int, in_features: int, act_dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Scales ``[N, G]`` and unsigned zero points ``[N, G]`` -> (``sz`` int32 ``[Gp, N]``, ge)."""
    n, groups = scale.shape
    g = in_features // groups
    ge = effective_group(g, bits)
    rep = g // ge
    s = scale.to(act_dtype)
    z = zero.to(torch.float32).to(act_dtype)
    if rep > 1:
        s = s.repeat_interleave(rep, dim=1)
        z = z.repeat_interleave(rep, dim=1)
    gp = padded_k(in_features, bits) // ge
    if gp != s.shape[1]:
        s = torch.nn.functional.pad(s, (0, gp - s.shape[1]))
        z = torch.nn.functional.pad(z, (0, gp - z.shape[1]))
    lo = s.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    hi = z.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return _to_int32(lo | (hi << 16)).t().contiguous(), ge


def unpack_scale_zero(sz: torch.Tensor, act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_scale_zero`: ``[Gp, N]`` -> (scale, zero) ``[N, Gp]`` in act dtype."""
    w = sz.t().contiguous().to(torch.int64) & _MASK32
    lo = (w & 0xFFFF).to(torch.int32).to(torch.int16)  # wraps to the same 16 bits
    hi = (w >> 16).to(torch.int32).to(torch.int16)
    return lo.view(act_dtype), hi.view(act_dtype)


def repack(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    in_features: int,
    act_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Checkpoint tensors -> (qweight, sz, effective group). Runs on the tensors' device."""
    n = weight_packed.shape[0]
    if n == 0 or in_features == 0:
        raise ValueError(f"empty weight ({n} x {in_features}) cannot be repacked")
    # unpacking widens codes to int64: go in row chunks of ~16M values to bound load-time memory
    rows = max(1, (1 << 24) // padded_k(in_features, bits))
    chunks = [
        pack_codes(unpack_rows(weight_packed[r : r + rows], bits, in_features), bits)
        for r in range(0, n, rows)
    ]
    qweight = torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]
    if weight_zero_point is None:
        zero = torch.full(weight_scale.shape, 1 << (bits - 1), dtype=torch.int32, device=qweight.device)
    else:
        zero = unpack_columns(weight_zero_point, bits, n)
    sz, ge = pack_scale_zero(weight_scale, zero, bits, in_features, act_dtype)
    return qweight, sz, ge
