"""Repack compressed-tensors ``pack-quantized`` tensors into the Triton kernels' layout (torch only).

Checkpoint layout (input, see :mod:`vllm_plugin.kernels.base`):
    weight_packed      int32 [N, ceil(K*b/32)]   dense little-end-first bitstream along K
    weight_scale       act dtype [N, K/g]
    weight_zero_point  int32 [ceil(N*b/32), K/g] packed along N (None: symmetric, z = 2^(b-1))

Kernel layout ("lane-paired units", output of :func:`repack`):
    A *unit* is one int32 word (b = 2: 16 codes, b = 4: 8 codes) or, for b = 3, one word in each of
    three planes (32 codes in 96 bits). ``VPW`` = codes per unit (16 / 32 / 8). A word is two 16-bit
    *lanes* (bits 0-15 and 16-31); the fields at the same position of both lanes are two
    *neighbouring* input columns, so one mask-and-or turns them into a packed pair of bf16/fp16
    values -- the register format of a tensor-core operand (see :mod:`.kernels`).
    K is cut into *blocks* of ``SUB * VPW`` values (SUB = 16; 256 / 512 / 128 values for b = 2/3/4)
    and padded with code 0 to a whole number of blocks (``K_pad``). A block is ``NT = VPW / 2``
    *tiles* of 32 columns; field position ``t`` (both lanes) of the 16 units of a block covers tile t:
        k = block * SUB * VPW + 32 * t + 2 * j + lane      (unit j < 16, lane 0/1, t < NT)
    qweight int32 [PLANES, N, U]   PLANES = 3 for b = 3 else 1; U = K_pad / VPW units per row.
        b = 2, 4: tile t at bits [t*b, (t+1)*b) of each lane (bit 16*lane + t*b of the word).
        b = 3: plane p holds tiles 5p .. 5p+4 at bits 3(t-5p) of each lane; tile 15 is spread over
        bit 15 of each lane of the three planes (plane p holds bit p of the code).
    sz int32 [K_pad / ge, N]   one word per (effective group, output channel): low half = scale,
        high half = zero point, both as act-dtype bit patterns (the zero point is a small integer,
        exact in bf16/fp16). Groups are stored group-major so a tile of channels is one contiguous
        load. ``ge`` (the effective group, :func:`effective_group`) is 32, 64 or 128 columns: one to
        four whole tiles; a longer group (e.g. per-channel scales) is repeated per 128-column piece.
        Padding groups hold scale 0.
"""

from __future__ import annotations

import math

import torch

from vlmptq.checkpoint.packing import unpack_columns, unpack_rows

SUB = 16  # units per block
TILE = 32  # columns per tile: one field position of a block's 16 units, both lanes
PIECE = 128  # longest run of columns one scale/zero entry covers in the kernel layout
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


def tiles_per_block(bits: int) -> int:
    return block_values(bits) // TILE


def padded_k(in_features: int, bits: int) -> int:
    bk = block_values(bits)
    return math.ceil(in_features / bk) * bk


def effective_group(group_size: int, in_features: int) -> int:
    """Columns per scale/zero entry in the kernel layout: 32, 64 or 128 (one to four whole tiles).

    One group per row (per-channel scales, ``group_size >= in_features``) is repeated per 128-column
    piece; otherwise the group size must be a multiple of :data:`TILE`."""
    if group_size >= in_features:
        return PIECE
    if group_size <= 0 or group_size % TILE:
        raise ValueError(f"the Triton kernels take group sizes that are multiples of {TILE} or per-channel "
                         f"scales, got group size {group_size} for {in_features} input features")
    return math.gcd(group_size, PIECE)


def kernel_shapes(bits: int, out_features: int, in_features: int, group_size: int) -> tuple[tuple, tuple]:
    """Shapes of (``qweight``, ``sz``) that :func:`repack` makes for this layer (for launches built
    without real weights: compile-only checks, benchmark pre-compiles)."""
    kp = padded_k(in_features, bits)
    return ((planes(bits), out_features, kp // codes_per_unit(bits)),
            (kp // effective_group(group_size, in_features), out_features))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _field_shifts(bits: int, device: torch.device) -> torch.Tensor:
    """Bit position of tile t, lane l's field in its word: ``[NT, 2]`` (b = 3: within its plane;
    tile 15 is handled separately)."""
    nt = tiles_per_block(bits)
    t = torch.arange(nt, device=device, dtype=torch.int64)
    pos = 3 * (t % 5) if bits == 3 else t * bits
    return pos[:, None] + 16 * torch.arange(2, device=device, dtype=torch.int64)[None, :]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` -> ``qweight`` int32 ``[PLANES, N, U]`` (layout above)."""
    n, k = codes.shape
    nt, bk = tiles_per_block(bits), block_values(bits)
    kp = padded_k(k, bits)
    c = codes.to(torch.int64)
    if kp != k:
        c = torch.nn.functional.pad(c, (0, kp - k))
    # column = block * bk + 32 t + 2 j + lane -> [N, blocks, unit j, tile t, lane]
    c = c.view(n, kp // bk, nt, SUB, 2).permute(0, 1, 3, 2, 4)
    sh = _field_shifts(bits, c.device)
    if bits != 3:
        words = (c << sh).sum((-1, -2))  # fields are disjoint: sum == bitwise or
        return _to_int32(words.reshape(1, n, -1)).contiguous()
    lane_top = torch.tensor([15, 31], device=c.device, dtype=torch.int64)
    out = []
    for p in range(3):
        words = (c[..., 5 * p : 5 * p + 5, :] << sh[5 * p : 5 * p + 5]).sum((-1, -2))
        words = words | (((c[..., 15, :] >> p) & 1) << lane_top).sum(-1)
        out.append(_to_int32(words.reshape(n, -1)))
    return torch.stack(out).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[PLANES, N, U]`` -> uint8 codes ``[N, in_features]``."""
    _, n, u = qweight.shape
    nt, bk = tiles_per_block(bits), block_values(bits)
    w = qweight.to(torch.int64) & _MASK32
    sh = _field_shifts(bits, w.device)
    if bits != 3:
        c = (w[0][..., None, None] >> sh) & ((1 << bits) - 1)  # [N, U, NT, 2]
    else:
        parts = [(w[p][..., None, None] >> sh[5 * p : 5 * p + 5]) & 7 for p in range(3)]
        lane_top = torch.tensor([15, 31], device=w.device, dtype=torch.int64)
        c15 = sum(((w[p][..., None] >> lane_top) & 1) << p for p in range(3))  # [N, U, 2]
        c = torch.cat(parts + [c15[..., None, :]], dim=-2)  # [N, U, 16, 2]
    blocks = u // SUB
    c = c.view(n, blocks, SUB, nt, 2).permute(0, 1, 3, 2, 4).reshape(n, blocks * bk)
    return c[:, :in_features].to(torch.uint8)


def pack_scale_zero(
    scale: torch.Tensor, zero: torch.Tensor, bits: int, in_features: int, act_dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Scales ``[N, G]`` and unsigned zero points ``[N, G]`` -> (``sz`` int32 ``[Gp, N]``, ge)."""
    n, groups = scale.shape
    g = in_features // groups
    ge = effective_group(g, in_features)
    gp = padded_k(in_features, bits) // ge
    s = scale.to(act_dtype)
    z = zero.to(torch.float32).to(act_dtype)
    if groups == 1:
        s, z = s.expand(n, gp), z.expand(n, gp)
    elif g > ge:
        s = s.repeat_interleave(g // ge, dim=1)
        z = z.repeat_interleave(g // ge, dim=1)
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
