"""Triton kernels for ``y = x @ dequant(W).T (+ bias)`` on the lane-paired layout of :mod:`.layout`.

Both kernels share one inner step, the *chunk tile* (:func:`_chunk_tile`): from the 16 units of a
block row (int32 ``[BLOCK_N, 16]`` per plane) build ``code - zero`` (optionally times the scale) for
a 128-column chunk (4 tiles; a group is 1, 2 or 4 tiles = ``TPG``) as a ``[BLOCK_N, 128]`` tensor in
the activation dtype:

1. per tile, one shift per word (shared by the tiles a shift serves) and one LOP3 per word,
   ``(w >> S) & (mask << p) | MAGIC``: both lanes at once become the 16-bit floats ``B + code * 2^p``
   (bf16: ``0x4300`` = 128, fp16: ``0x6400`` = 1024; ``p + b <= 7`` keeps the field in the mantissa);
2. per tile, one packed FMA per word, ``v * 2^-p - (B / 2^p + zero)`` = ``code - zero`` (exact:
   small integers), and a second one for the scale when the tile carries it. Inline PTX
   ``fma.rn.{bf16x2,f16x2}`` on the int32 word (:func:`_packed_fma`): Triton's own 16-bit
   arithmetic reaches ptxas as scalar ops, which it paired across the wrong register halves (a
   PRMT per pair in the sm_90 SASS). The Triton interpreter cannot run PTX; with ``INTERPRET``
   that one instruction is emulated on unpacked lanes, everything around it is the same code;
3. join the tiles' words, permute them into column order and split each word into its lanes:
   the pair of a word stays in its 32-bit register, so this is register renaming (the one
   layout conversion left is to the MMA operand, through shared memory).

Per weight: <= 0.5 shift, 0.5 LOP3, 0.5 FMA, the conversion and the MMA (sm_90 SASS counts from
``benchmarks/kernel_static.py``).

* ``_mma_kernel`` (decode to prefill, M <= 256): ``tl.dot`` of the chunk tile with the
  ``[128, BLOCK_M]`` slice of ``x^T`` (``out^T = W x^T``: small M sits in the MMA's N dimension,
  M = 1 included), fp32 accumulators.
* ``_gemv_kernel`` (decode, M = 1): no tensor cores and no shared memory. The lane words of
  :func:`_lanes` (``B + code * 2^p`` in both 16-bit lanes) are widened to float32 (bf16: one shift or
  one mask per lane) and multiplied with ``x * 2^-p`` on the CUDA cores; ``zero`` and ``B`` come off
  per group through the sums of ``x`` (``sum_k (B + c_k 2^p) x_k 2^-p = B X' + sum_k c_k x_k``), the
  scale once per (row, group). Per weight: <= 0.5 shift, 0.5 LOP3, 1 widening, 1 FFMA.
  Grid (N tiles, K splits); the splits of a tile add up through :func:`_finish`.
* ``_dequant_kernel`` (large prefill): writes ``dequant(W)`` in act dtype for a cuBLAS matmul.
* ``_moe_mma_kernel`` (mixture of experts, :mod:`.moe`): the MMA loop per (block of one expert's routed rows,
  N tile), rows gathered, no K split; ``_moe_align_kernel`` sorts the routed rows into those blocks.

The MMA kernel is persistent and splits the tiles x K-blocks iteration space evenly over its
programs (stream-K); a tile shared by several programs gets its partial sums through an fp32
workspace, and the last program to finish it (counted with an atomic per tile in ``lock``) adds
them in a fixed order and writes the output, then resets its counter to 0 -- one launch, no
memset, deterministic, CUDA-graph safe.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lanes(w0, w1, w2, T: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, rz):
    """Tile ``T`` of the unit words as int32 words holding two 16-bit floats ``B + code * 2^P``.

    ``rz`` is an *opaque* runtime 0 (``N >> 31``): or-ed into the masks it keeps them in registers
    (with constant masks ptxas re-materializes a mask before every LOP3)."""
    if BITS == 3 and T == 15:  # bit p of the code is bit 15 of each lane of plane p
        r = ((w0 >> 15) & (rz + 0x10001)) | ((w1 >> 14) & (rz + 0x20002)) | ((w2 >> 13) & (rz + 0x40004)) | MAGIC
    else:
        w = w0
        if BITS == 3:
            POS: tl.constexpr = 3 * (T % 5)
            if T >= 5:
                w = w1
            if T >= 10:
                w = w2
        else:
            POS: tl.constexpr = BITS * T
        if POS - P > 0:
            w = w >> (POS - P)
        r = (w & ((rz + ((1 << BITS) - 1) * 0x10001) << P)) | MAGIC
    return r


@triton.jit
def _lane(w, HI: tl.constexpr, ACT: tl.constexpr):
    """Lane 0 / 1 of int32 words as float32 (the act-dtype value it holds)."""
    if HI:
        w = w >> 16
    return w.to(tl.int16).to(ACT, bitcast=True).to(tl.float32)


@triton.jit
def _packed_fma(a, b, c, ACT: tl.constexpr, INTERPRET: tl.constexpr):
    """``a * b + c`` lane by lane on int32 words holding two act-dtype values each: one instruction.
    The Triton interpreter cannot run PTX; there the lanes are unpacked and ``a * b + c`` rounded once
    to ACT (the product and sum are exact in float32 for the kernels' operands, so this is the FMA)."""
    if INTERPRET:
        lo = (_lane(a, False, ACT) * _lane(b, False, ACT) + _lane(c, False, ACT)).to(ACT)
        hi = (_lane(a, True, ACT) * _lane(b, True, ACT) + _lane(c, True, ACT)).to(ACT)
        out = (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)
    elif ACT == tl.float16:
        out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                        dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton.jit
def _code_minus_zero(r, P: tl.constexpr, szw, ACT: tl.constexpr, SCALED: tl.constexpr, INTERPRET: tl.constexpr):
    """``v * 2^-P - (B / 2^P + zero)`` (times the scale if SCALED) on both lanes of the int32 words
    ``r``, as int32 words of two act-dtype values; ``szw`` is the rows' int32 (scale | zero << 16)
    word ``[BLOCK_N]``. The first step is exact (small integers); the scaled value is rounded once,
    as the reference's dequantized weight is. Per row the constants cost one shift/or (the zero in
    both lanes) and one packed FMA per P (``-zero - B / 2^P``, exact), shared by the tiles."""
    if ACT == tl.float16:
        EXP_BIAS: tl.constexpr = 15
        MANT: tl.constexpr = 10
    else:
        EXP_BIAS: tl.constexpr = 127
        MANT: tl.constexpr = 7
    # act-dtype pairs as int32 constants (the negative ones wrap: (v + 2^31) % 2^32 - 2^31)
    TWO_P: tl.constexpr = ((EXP_BIAS - P) << MANT) * 0x10001  # 2^-P in both lanes
    NEG_ONE: tl.constexpr = ((0x8000 | (EXP_BIAS << MANT)) * 0x10001 + 2**31) % 2**32 - 2**31  # -1
    NEG_BP: tl.constexpr = ((0x8000 | ((EXP_BIAS + MANT - P) << MANT)) * 0x10001 + 2**31) % 2**32 - 2**31  # -B/2^P
    zz = ((szw >> 16) & 0xFFFF) | (szw & -65536)  # the zero point in both lanes
    c = _packed_fma(zz, tl.full([1], NEG_ONE, tl.int32), tl.full([1], NEG_BP, tl.int32), ACT, INTERPRET)
    out = _packed_fma(r, tl.full([1, 1], TWO_P, tl.int32), c[:, None], ACT, INTERPRET)
    if SCALED:
        ss = (szw & 0xFFFF) | (szw << 16)  # the scale in both lanes
        out = _packed_fma(out, ss[:, None], tl.full([1, 1], -2147450880, tl.int32), ACT, INTERPRET)  # + (-0, -0)
    return out


@triton.jit
def _tile_words(w0, w1, w2, szw, T: tl.constexpr, BITS: tl.constexpr, ACT: tl.constexpr, rz,
                SCALED: tl.constexpr, INTERPRET: tl.constexpr):
    """Tile ``T`` as int32 words of two act-dtype values ``code - zero`` (times the scale if SCALED):
    ``[BLOCK_N, 16]``; ``szw`` = the rows' (scale | zero << 16) words of the tile's group."""
    if ACT == tl.float16:
        MAGIC: tl.constexpr = 0x64006400  # 1024 + field
    else:
        MAGIC: tl.constexpr = 0x43004300  # 128 + field
    # the field's bit within its lane after the word's shift: 0 for b = 4; the shifts by 6 / 12
    # serve three (b = 2) or two (b = 3) tiles each, fields sit at bits 0-5 (p + b <= 7)
    if BITS == 4 or (BITS == 3 and T == 15):
        P: tl.constexpr = 0
    elif BITS == 3:
        P: tl.constexpr = (3 * (T % 5)) % 6
    else:
        P: tl.constexpr = (2 * T) % 6
    r = _lanes(w0, w1, w2, T, P, BITS, MAGIC, rz)
    return _code_minus_zero(r, P, szw, ACT, SCALED, INTERPRET)


@triton.jit
def _chunk_tile(w0, w1, w2, sza, szb, szc, szd, T0: tl.constexpr, BITS: tl.constexpr,
                ACT: tl.constexpr, BLOCK_N: tl.constexpr, rz, SCALED: tl.constexpr, INTERPRET: tl.constexpr):
    """Tiles ``T0 .. T0+3`` (128 columns) as ``[BLOCK_N, 128]`` ``code - zero`` in ACT (times the
    scale if SCALED), column ``c`` = block column ``32 * T0 + c``; tile ``T0+i`` uses the (scale |
    zero << 16) words ``sz*`` number i (its group's). The tiles' words are joined and permuted (pair
    index ``16 t + j``) before the split into lanes, so each pair stays in its register."""
    ra = _tile_words(w0, w1, w2, sza, T0, BITS, ACT, rz, SCALED, INTERPRET)
    rb = _tile_words(w0, w1, w2, szb, T0 + 1, BITS, ACT, rz, SCALED, INTERPRET)
    rc = _tile_words(w0, w1, w2, szc, T0 + 2, BITS, ACT, rz, SCALED, INTERPRET)
    rd = _tile_words(w0, w1, w2, szd, T0 + 3, BITS, ACT, rz, SCALED, INTERPRET)
    r = tl.reshape(tl.permute(tl.join(tl.join(ra, rb), tl.join(rc, rd)), (0, 3, 2, 1)), (BLOCK_N, 64))
    q = tl.join(r.to(tl.int16), (r >> 16).to(tl.int16))  # [BLOCK_N, 64, lane]
    return tl.reshape(q, (BLOCK_N, 128)).to(ACT, bitcast=True)


@triton.jit
def _chunk_sz(sz_ptr, g0, N, offs_n, nmask, TPG: tl.constexpr):
    """(scale | zero << 16) words ``[BLOCK_N]`` of the 4 tiles of a 128-column chunk whose first
    group is ``g0`` (groups of TPG tiles: 4 -> one load, 2 -> two, 1 -> four)."""
    sza = tl.load(sz_ptr + g0 * N + offs_n, mask=nmask, other=0)
    if TPG == 4:
        szb, szc, szd = sza, sza, sza
    elif TPG == 2:
        szc = tl.load(sz_ptr + (g0 + 1) * N + offs_n, mask=nmask, other=0)
        szb, szd = sza, szc
    else:
        szb = tl.load(sz_ptr + (g0 + 1) * N + offs_n, mask=nmask, other=0)
        szc = tl.load(sz_ptr + (g0 + 2) * N + offs_n, mask=nmask, other=0)
        szd = tl.load(sz_ptr + (g0 + 3) * N + offs_n, mask=nmask, other=0)
    return sza, szb, szc, szd


@triton.jit
def _load_unit(ptrs, plane_stride, mask, PLANES: tl.constexpr):
    """int32 words ``[BLOCK_N, 16]`` of one block at ``ptrs``: ``w0``, and for 3 bits the other two
    planes ``plane_stride`` words on (``w1``/``w2``; otherwise ``w0`` again, unused)."""
    w0 = tl.load(ptrs, mask=mask, other=0)
    if PLANES == 3:
        w1 = tl.load(ptrs + plane_stride, mask=mask, other=0)
        w2 = tl.load(ptrs + 2 * plane_stride, mask=mask, other=0)
    else:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _scale_zero(sz, ACT: tl.constexpr):
    """int32 (scale | zero << 16) words, act-dtype bit patterns -> (scale, zero) as float32."""
    s = (sz & 0xFFFF).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    z = (sz >> 16).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    return s, z


@triton.jit
def _block_mma(acc, b, w_ptrs, x_ptrs, sz_ptr, N, K, U, offs_n, nmask, mmask, offs_c, rz,
               BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, TPG: tl.constexpr,
               BLOCK_N: tl.constexpr, SCALED: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc [BLOCK_N, BLOCK_M]`` plus layout block ``b`` of the rows at ``w_ptrs`` times the activations'
    ``x^T`` slices at ``x_ptrs`` (``[128, BLOCK_M]`` pointers of columns 0-127): one ``tl.dot`` per 128-column
    chunk tile (scaled after the dot unless SCALED, see :func:`_mma_kernel`)."""
    SUB: tl.constexpr = 16
    CPB: tl.constexpr = BK // 128  # chunks per block
    ACT: tl.constexpr = x_ptrs.dtype.element_ty
    w0, w1, w2 = _load_unit(w_ptrs + b * SUB, N * U, nmask[:, None], PLANES)
    for ci in tl.static_range(CPB):
        sza, szb, szc, szd = _chunk_sz(sz_ptr, b * GPB + ci * (GPB // CPB), N, offs_n, nmask, TPG)
        q = _chunk_tile(w0, w1, w2, sza, szb, szc, szd, 4 * ci, BITS, ACT, BLOCK_N, rz, SCALED, INTERPRET)
        k0 = b * BK + ci * 128
        if EVEN_K:
            xt = tl.load(x_ptrs + k0, mask=mmask[None, :], other=0.0)
        else:
            xt = tl.load(x_ptrs + k0, mask=mmask[None, :] & ((k0 + offs_c) < K)[:, None], other=0.0)
        if SCALED:
            acc = tl.dot(q, xt, acc)
        else:
            acc += _scale_zero(sza, ACT)[0][:, None] * tl.dot(q, xt)
    return acc


@triton.jit
def _finish(y, offs_n, offs_m, M, N, out_ptr, bias_ptr, ws_ptr, lock_ptr, tile, part, parts, HAS_BIAS: tl.constexpr):
    """Write ``y [BLOCK_N, BLOCK_M]`` (fp32, part ``part`` of ``parts`` of a tile's K range) to
    ``out[m, n]``: directly if it is the whole range, else through the workspace (slot ``part``),
    the last part to arrive adding the slots in order."""
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    idx = offs_m[None, :] * N + offs_n[:, None]
    if parts > 1:
        tl.store(ws_ptr + part * M * N + idx, y, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the counter moves
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == parts - 1:  # last part of this tile: reduce in a fixed order
            # (.to: with one slot the launch passes the output as the workspace -- this branch never runs
            # then, but it must still type-check for a 16-bit ws_ptr)
            y = tl.load(ws_ptr + idx, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            for s in range(1, parts):
                y += tl.load(ws_ptr + s * M * N + idx, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma_kernel(
    x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, U, n_tiles_n, iters,
    BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, TPG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Persistent tensor-core GEMM (``out^T = W x^T``) over ``iters`` = tiles x blocks iterations:
    program ``p`` of ``G`` takes iterations ``[p * iters // G, (p + 1) * iters // G)`` in tile-major
    order ("stream-K"), so every program gets the same work whatever the tile count -- no partly
    filled last wave. A tile's K blocks run as one pipelined loop per program; a tile cut between
    programs is summed through the workspace by :func:`_finish`. Per 128-column chunk one ``tl.dot``
    of the ``[BLOCK_N, 128]`` chunk tile with ``x^T[128, BLOCK_M]``.

    Scales: with 128-column groups and M tiles up to 32 rows the dot runs on exact ``code - zero``
    and its ``[BLOCK_N, BLOCK_M]`` result is scaled (BLOCK_M / 128 FFMAs per weight); otherwise
    (SCALED) a second packed FMA scales the tile (0.5 per weight, fewer registers, and the only way
    when a chunk holds several groups)."""
    SUB: tl.constexpr = 16
    SCALED: tl.constexpr = BLOCK_M >= 64 or TPG < 4
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    nblk = U // SUB
    it = (pid.to(tl.int64) * iters // n_prog).to(tl.int32)
    it_end = ((pid.to(tl.int64) + 1) * iters // n_prog).to(tl.int32)
    offs_j = tl.arange(0, SUB)
    offs_c = tl.arange(0, 128)
    rz = N >> 31  # an opaque 0 (N >= 0), see _lanes
    while it < it_end:
        tile = it // nblk
        t0 = tile * nblk
        b_end = tl.minimum(nblk, it_end - t0)
        offs_n = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = (tile // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        nmask = offs_n < N
        mmask = offs_m < M
        w_ptrs = qw_ptr + offs_n[:, None] * U + offs_j[None, :]
        x_ptrs = x_ptr + offs_m[None, :] * K + offs_c[:, None]  # [128, BLOCK_M]: x^T slice
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for b in range(it - t0, b_end):
            acc = _block_mma(acc, b, w_ptrs, x_ptrs, sz_ptr, N, K, U, offs_n, nmask, mmask, offs_c, rz, BITS, PLANES,
                             BK, GPB, TPG, BLOCK_N, SCALED, EVEN_K, INTERPRET)
        # the programs sharing this tile: those holding its first and its last iteration
        first = ((t0 + 1).to(tl.int64) * n_prog + iters - 1) // iters - 1
        last = ((t0 + nblk).to(tl.int64) * n_prog + iters - 1) // iters - 1
        _finish(acc, offs_n, offs_m, M, N, out_ptr, bias_ptr, ws_ptr, lock_ptr, tile, (pid - first).to(tl.int32),
                (last - first + 1).to(tl.int32), HAS_BIAS)
        it = t0 + b_end


@triton.jit
def _widen(r, HI: tl.constexpr, ACT: tl.constexpr):
    """Lane 0 / 1 of int32 words as float32: bf16 is the top half of a float32 (a shift or a mask),
    fp16 goes through a conversion."""
    if ACT == tl.bfloat16:
        if HI:
            out = (r & -65536).to(tl.float32, bitcast=True)
        else:
            out = (r << 16).to(tl.float32, bitcast=True)
    else:
        out = _lane(r, HI, ACT)
    return out


@triton.jit
def _gemv_tile(acc, xs, xps, w0, w1, w2, xw, T: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr,
               ACT: tl.constexpr, rz):
    """Tile ``T`` of a layout block into the group sums of :func:`_gemv_kernel`: ``acc [BLOCK_N, 16] +=
    (B + c 2^P) * x 2^-P`` (both lanes), ``xs += sum x``, ``xps += sum x 2^-P``; ``xw [BLOCK_N, 16]``: the
    tile's activation pairs as int32 words (lane 0 = the even column), the same in every row."""
    if BITS == 4 or (BITS == 3 and T == 15):
        P: tl.constexpr = 0
    elif BITS == 3:
        P: tl.constexpr = (3 * (T % 5)) % 6
    else:
        P: tl.constexpr = (2 * T) % 6
    r = _lanes(w0, w1, w2, T, P, BITS, MAGIC, rz)
    x_lo = _widen(xw, False, ACT)
    x_hi = _widen(xw, True, ACT)
    xs += x_lo + x_hi
    x_lo = x_lo * (1.0 / (1 << P))  # exact: a power of two
    x_hi = x_hi * (1.0 / (1 << P))
    xps += x_lo + x_hi
    acc += _widen(r, False, ACT) * x_lo
    acc += _widen(r, True, ACT) * x_hi
    return acc, xs, xps


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, U, bps,
    BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, TPG: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``out [1, N] = x [1, K] @ dequant(W).T`` on the CUDA cores (one activation row).

    Program ``(n, s)``: rows ``n * BLOCK_N ..`` over layout blocks ``[s * bps, (s + 1) * bps)``. Per block
    and group: ``acc[n, j] = sum_tiles (B + c 2^p) x 2^-p`` over unit ``j``'s two lanes, ``xs`` / ``xps``
    the same sums of ``x`` / ``x 2^-p`` (every row holds the same: they are kept in the weights' register
    layout, so nothing moves between threads); then ``total += scale * (acc - B xps - zero xs)``, summed
    over ``j`` once at the end. The activations are read as int32 pairs of the 16-bit values (one 16-byte
    load per 4 units and row group). The part is written by :func:`_finish` (tile ``n``, part ``s``)."""
    SUB: tl.constexpr = 16
    ACT: tl.constexpr = x_ptr.dtype.element_ty
    if ACT == tl.float16:
        MAGIC: tl.constexpr = 0x64006400
        B: tl.constexpr = 1024.0
    else:
        MAGIC: tl.constexpr = 0x43004300
        B: tl.constexpr = 128.0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    nblk = U // SUB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_j = tl.arange(0, SUB)
    rz = N >> 31  # an opaque 0, see _lanes
    w_ptrs = qw_ptr + offs_n[:, None] * U + offs_j[None, :]
    # x as int32 pairs, with a [BLOCK_N, 16] pointer (the same address in every row) so the pairs land
    # in the weights' layout
    xw_ptrs = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs_j[None, :] + 0 * offs_n[:, None]
    total = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
    b_end = tl.minimum(nblk, (pid_k + 1) * bps)
    for b in range(pid_k * bps, b_end):
        w0, w1, w2 = _load_unit(w_ptrs + b * SUB, N * U, nmask[:, None], PLANES)
        for gi in tl.static_range(GPB):
            acc = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
            xs = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
            xps = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
            for ti in tl.static_range(TPG):
                w_at = (b * BK + 32 * (gi * TPG + ti)) // 2  # the tile's first activation pair
                if EVEN_K:
                    xw = tl.load(xw_ptrs + w_at)
                else:  # pairs past K read as 0; the last one's upper half too when K is odd (its 2 bytes past
                    # x's end are read and dropped: inside the allocator's 512-byte granule)
                    col = 2 * (w_at + offs_j[None, :])
                    xw = tl.load(xw_ptrs + w_at, mask=col < K, other=0)
                    xw = tl.where(col + 1 < K, xw, xw & 0xFFFF)
                acc, xs, xps = _gemv_tile(acc, xs, xps, w0, w1, w2, xw, gi * TPG + ti, BITS, MAGIC, ACT, rz)
            s, z = _scale_zero(tl.load(sz_ptr + (b * GPB + gi) * N + offs_n, mask=nmask, other=0), ACT)
            total += s[:, None] * (acc - B * xps - z[:, None] * xs)
    y = tl.sum(total, axis=1)[:, None]  # [BLOCK_N, 1]
    _finish(y, offs_n, tl.arange(0, 1), M, N, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid_n, pid_k, tl.num_programs(1),
            HAS_BIAS)


@triton.jit
def _dequant_kernel(
    qw_ptr, sz_ptr, w_ptr, N, K, U,
    BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, TPG: tl.constexpr,
    BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``w[n, k] = (code - zero) * scale`` in act dtype, one block of K per program (axis 1)."""
    SUB: tl.constexpr = 16
    CPB: tl.constexpr = BK // 128
    ACT: tl.constexpr = w_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_j = tl.arange(0, SUB)
    offs_c = tl.arange(0, 128)
    w0, w1, w2 = _load_unit(qw_ptr + offs_n[:, None] * U + b * SUB + offs_j[None, :], N * U, nmask[:, None], PLANES)
    for ci in tl.static_range(CPB):
        sza, szb, szc, szd = _chunk_sz(sz_ptr, b * GPB + ci * (GPB // CPB), N, offs_n, nmask, TPG)
        v = _chunk_tile(w0, w1, w2, sza, szb, szc, szd, 4 * ci, BITS, ACT, BLOCK_N, 0, True, INTERPRET)
        k = b * BK + ci * 128 + offs_c
        dst = w_ptr + offs_n[:, None] * K + k[None, :]
        if EVEN_K:
            tl.store(dst, v, mask=nmask[:, None])
        else:
            tl.store(dst, v, mask=nmask[:, None] & (k < K)[None, :])


@triton.jit
def _moe_mma_kernel(
    x_ptr, qw_ptr, sz_ptr, out_ptr, rows_ptr, block_expert_ptr, nblocks_ptr, rw_ptr,
    R, N, K, U, G, ROW_DIV,
    BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, TPG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, GATED: tl.constexpr, SORTED: tl.constexpr, EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr, GELU: tl.constexpr = False,
):
    """Grouped GEMM of the routed experts (:mod:`.moe`): ``out[r] = dequant(W_e) @ x[r // ROW_DIV]`` for
    every routed row ``r`` (a (token, slot) pair) of expert ``e``, times the row's routing weight ``rw[r]``
    if MUL_WEIGHT. GATED (the gate/up launch): W's rows alternate gate and up (row ``2j`` gate_proj row ``j``,
    ``2j + 1`` up_proj row ``j``), and the epilogue writes ``silu(gate) * up`` (GELU: ``gelu_tanh(gate) * up``,
    Gemma 4's experts; fp32, one rounding) as ``out [R, N / 2]``.

    Rows come sorted by expert in blocks of BLOCK_M (``rows[BLOCK_M * b ...]``, padded with ``R``) that
    each belong to one expert (``block_expert[b]``); only the first ``nblocks[0]`` blocks are real, the
    grid covers the most there can be (a shape-only bound) and the rest return at once. Unless SORTED (a few
    rows, e.g. decode) there is no alignment: block ``b`` is routed row ``b`` alone, ``block_expert`` is the
    routing itself (``topk_ids`` flattened) and the grid has one block per row. Program
    ``(b, n)`` computes rows block ``b`` x output channels tile ``n`` over the whole K range with the
    dense kernel's chunk tile and ``tl.dot`` (``out^T = W x^T``); no K split, so no workspace. Weights:
    ``qw [E, PLANES, N, U]``, ``sz [E, G, N]`` (the dense layout per expert)."""
    SUB: tl.constexpr = 16
    SCALED: tl.constexpr = BLOCK_M >= 64 or TPG < 4
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SORTED:
        if pid_m >= tl.load(nblocks_ptr):
            return
        rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    else:
        rows = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, R)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    mmask = rows < R
    src = (rows // ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_j = tl.arange(0, SUB)
    offs_c = tl.arange(0, 128)
    rz = N >> 31  # an opaque 0, see _lanes
    w_ptrs = qw_ptr + e * PLANES * N * U + offs_n[:, None] * U + offs_j[None, :]
    sz_e = sz_ptr + e * G * N
    x_ptrs = x_ptr + src[None, :] * K + offs_c[:, None]  # [128, BLOCK_M]: the gathered rows' x^T slice
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for b in range(0, U // SUB):
        acc = _block_mma(acc, b, w_ptrs, x_ptrs, sz_e, N, K, U, offs_n, nmask, mmask, offs_c, rz, BITS, PLANES, BK,
                         GPB, TPG, BLOCK_N, SCALED, EVEN_K, INTERPRET)
    if MUL_WEIGHT:
        acc = acc * tl.load(rw_ptr + rows, mask=mmask, other=0.0).to(tl.float32)[None, :]
    if GATED:  # rows 2j / 2j+1 of the tile are gate / up of output channel pid_n * BLOCK_N / 2 + j
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N // 2, 2, BLOCK_M)), (0, 2, 1)))
        offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        dst = out_ptr + rows[None, :].to(tl.int64) * (N // 2) + offs_h[:, None]
        if GELU:  # 0.5 g (1 + tanh(z)) = g sigmoid(2 z), z = sqrt(2 / pi) (g + 0.044715 g^3)
            act = gate / (1.0 + tl.exp(-1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)))
        else:
            act = gate / (1.0 + tl.exp(-gate))
        tl.store(dst, (act * up).to(out_ptr.dtype.element_ty), mask=(offs_h < N // 2)[:, None] & mmask[None, :])
    else:
        dst = out_ptr + rows[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


@triton.jit
def _moe_align_kernel(ids_ptr, rows_ptr, block_expert_ptr, nblocks_ptr, R, E, CAP,
                      EP: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """:func:`.moe.align_routed` in one program (its torch version is the reference: same ``rows`` and
    ``block_expert`` over the ``nblocks`` real blocks; ``rows`` beyond them is left unwritten, nothing reads it).

    Pass 1 counts each expert's rows (one-hot sums over chunks of CHUNK rows; EP = E rounded up to a power of
    two), then every expert's first slot is the exclusive prefix sum of its count padded to whole blocks. Pass 2
    places each row at its expert's first slot + the rows of that expert before it (earlier chunks: a running
    count; this chunk: a prefix sum of the one-hot columns), so rows keep token order within an expert. Then the
    padding slots of each expert's last block get ``R`` and each block its expert."""
    offs_e = tl.arange(0, EP)
    counts = tl.zeros([EP], dtype=tl.int32)
    for c0 in range(0, R, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < R, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    seen = tl.zeros([EP], dtype=tl.int32)
    for c0 in range(0, R, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < R, other=-1).to(tl.int32)
        hit = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [CHUNK, EP]
        before = tl.cumsum(hit, axis=0) - hit  # rows of the same expert earlier in this chunk
        dest = tl.sum(hit * (before + (starts + seen)[None, :]), axis=1)
        tl.store(rows_ptr + dest, offs, mask=offs < R)
        seen += tl.sum(hit, axis=0)
    for j in range(0, BLOCK_M - 1):  # the padding of each expert's last block
        tl.store(rows_ptr + starts + counts + j, R, mask=counts + j < padded)
    block_ends = ends // BLOCK_M
    for b0 in range(0, CAP, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        e = tl.sum((b[:, None] >= block_ends[None, :]).to(tl.int32), axis=1)  # experts wholly before block b
        tl.store(block_expert_ptr + b, tl.minimum(e, E - 1), mask=b < CAP)
    tl.store(nblocks_ptr, tl.sum(padded, axis=0) // BLOCK_M)
