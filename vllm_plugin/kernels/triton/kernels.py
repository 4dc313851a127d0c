"""Triton kernels for ``y = x @ dequant(W).T (+ bias)`` on the K-interleaved layout of :mod:`.layout`.

Three kernels share one inner step, "slot ``I`` of a block": from the 16 units of a block row take
code slot ``I`` (16 consecutive input columns), turn it into exact float32 ``code - zero`` and use
it with the matching 16 activations.

* ``_gemv_kernel`` (decode, one activation row per program): CUDA-core FMAs, fp32 accumulators
  ``[BLOCK_N, 16]``. Fields are read with a small bias (:func:`_biased`) and multiplied by x as they
  are; per group, the bias and zero-point terms ``sum_i (2^e_i + z) x_i`` (row-independent sums of x,
  times z) start the partial sum, and the scale multiplies it once.
* ``_dot_kernel`` (batched decode to prefill): ``tl.dot`` of the dequantized ``[BLOCK_N, 16 * NSC]``
  tile of up to 8 slots (joined and permuted into column order) with the matching ``x^T`` slice, i.e.
  ``out^T = W x^T`` so small M sits in the MMA's N dimension; fp32 accumulators, per-group scaling
  after the group's dots.
* ``_dequant_kernel`` (large prefill): writes ``dequant(W)`` in act dtype for a cuBLAS matmul.

Decode and batched kernels split K over ``n_split`` programs per output tile when the grid would be
too small; partial sums go to an fp32 workspace and the last program of a tile (counted with an
atomic per tile in ``lock``) adds them in a fixed order and writes the output, then resets its
counter to 0 -- one launch, no memset, deterministic, CUDA-graph safe.

Dequantization without int->float conversions: a field of ``NB`` bits at bit ``P`` (``P + NB <=
23``) is masked in place and or-ed with the exponent of ``2^(23-P)``: the float32 with those bits
is exactly ``2^(23-P) + code``; one subtraction of ``2^(23-P) + zero`` gives ``code - zero``. Fields
above bit 23 are shifted down once per word (16 bits) first. Per weight: one LOP3 (and+or), one
FADD, and the MMA (dot, dequant). The GEMV drops the FADD: it keeps ``2^e + code`` with ``2^e <= 2^12``
(fields moved into bits [11, 23 - NB] by two shifts per word) and subtracts ``2^e * sum x`` per group;
per weight one LOP3 and one FFMA. Instruction counts per weight for sm_90 come from
``benchmarks/kernel_static.py`` (SASS of the compiled kernels).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _magic(w, P: tl.constexpr, NB: tl.constexpr, rz):
    """Field of NB bits at bit P (P + NB <= 23) of int32 ``w`` as float32 ``2^(23-P) + code``.

    ``rz`` is 0: a literal 0 for a constant mask, or an *opaque* runtime 0 (``N >> 31``) that makes the
    mask a loop-invariant register. With constant masks ptxas re-materializes the mask before every
    LOP3 (one MOV per weight in the GEMV: ~0.5 instructions per weight, seen in the SASS)."""
    return ((w & ((rz + ((1 << NB) - 1)) << P)) | ((150 - P) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _plane_word(w0, w1, w2, I: tl.constexpr):
    """The W3 plane holding code slot ``I < 30`` (slots 10p .. 10p+9 live in plane p). One return:
    with a return in each branch the sm_90 dot loop grew from 4.84 to 6.34 instructions per weight."""
    w = w0
    if I >= 10:
        w = w1
    if I >= 20:
        w = w2
    return w


@triton.jit
def _slot(w0, w1, w2, zero, I: tl.constexpr, BITS: tl.constexpr, rz):
    """Code slot ``I`` of each unit minus ``zero`` as exact float32 (``w1``/``w2``: 3-bit planes;
    ``rz``: 0, see :func:`_magic`)."""
    if BITS == 3:
        if I < 30:
            w = _plane_word(w0, w1, w2, I)
            if (I % 10) * 3 <= 20:
                v = _magic(w, (I % 10) * 3, 3, rz) - ((1 << (23 - (I % 10) * 3)) + zero)
            else:
                v = _magic(w >> 16, (I % 10) * 3 - 16, 3, rz) - ((1 << (39 - (I % 10) * 3)) + zero)
        else:
            if I == 30:
                lo = (w0 >> 30) & 3
                hi = (w2 >> 28) & 4
            else:
                lo = (w1 >> 30) & 3
                hi = (w2 >> 29) & 4
            v = _magic(lo | hi, 0, 3, rz) - ((1 << 23) + zero)
    else:
        if I * BITS + BITS <= 23:
            v = _magic(w0, I * BITS, BITS, rz) - ((1 << (23 - I * BITS)) + zero)
        else:
            v = _magic(w0 >> 16, I * BITS - 16, BITS, rz) - ((1 << (39 - I * BITS)) + zero)
    return v


@triton.jit
def _tile(w0, w1, w2, zero, I0: tl.constexpr, NS: tl.constexpr, BITS: tl.constexpr, rz):
    """Slots ``I0 .. I0+NS-1`` (NS a power of two) as ``[BLOCK_N, 16, 2, ..., 2]`` float32 (joined
    halves: the last dim splits the slots in two, the next-to-last each half, ...)."""
    if NS == 1:
        return _slot(w0, w1, w2, zero, I0, BITS, rz)
    else:
        return tl.join(_tile(w0, w1, w2, zero, I0, NS // 2, BITS, rz),
                       _tile(w0, w1, w2, zero, I0 + NS // 2, NS // 2, BITS, rz))


@triton.jit
def _slots_tile(w0, w1, w2, zero, I0: tl.constexpr, NS: tl.constexpr, BITS: tl.constexpr, rz):
    """Slots ``I0 .. I0+NS-1`` as one ``[BLOCK_N, 16 * NS]`` tile whose column ``c`` is input column
    ``I0 * 16 + c`` of the block (slot-major, NS <= 8): one ``tl.dot`` with K = 16 * NS instead of
    NS dots with K = 16, each of which costs a wgmma fence / arrive / wait on sm_90."""
    t = _tile(w0, w1, w2, zero, I0, NS, BITS, rz)
    if NS == 8:
        t = tl.permute(t, (0, 4, 3, 2, 1))
    elif NS == 4:
        t = tl.permute(t, (0, 3, 2, 1))
    elif NS == 2:
        t = tl.permute(t, (0, 2, 1))
    return tl.reshape(t, (t.shape[0], 16 * NS))


@triton.jit
def _biased(w, P: tl.constexpr, NB: tl.constexpr, rz):
    """Field of NB bits at bit P of ``w`` as ``(2^e + code, 2^e)`` in float32 with a *small* bias
    ``2^e`` (4 <= 2^e <= 2^12): fields below bit 11 are read from ``w << 11``, fields ending above bit
    23 from ``w >> (13 - NB)``, so every field lands in bits [11, 23 - NB] (one shift per word each,
    shared by its fields). The GEMV sums ``(2^e + code) * x`` and removes ``sum 2^e * x`` once per group:
    one LOP3 per weight instead of LOP3 + FADD, at a rounding cost of ~2^-24 * 2^12 per term."""
    if P < 11:
        v = _magic(w << 11, P + 11, NB, rz)
        bias = tl.full([1], (150 - P - 11) << 23, tl.int32).to(tl.float32, bitcast=True)
    elif P + NB > 23:
        v = _magic(w >> (13 - NB), P - (13 - NB), NB, rz)
        bias = tl.full([1], (150 - P + (13 - NB)) << 23, tl.int32).to(tl.float32, bitcast=True)
    else:
        v = _magic(w, P, NB, rz)
        bias = tl.full([1], (150 - P) << 23, tl.int32).to(tl.float32, bitcast=True)
    return v, bias


@triton.jit
def _slot_biased(w0, w1, w2, I: tl.constexpr, BITS: tl.constexpr, rz):
    """Code slot ``I`` of each unit as ``(2^e + code, 2^e)`` (see :func:`_biased`)."""
    if BITS == 3:
        if I < 30:
            w = _plane_word(w0, w1, w2, I)
            v, bias = _biased(w, (I % 10) * 3, 3, rz)
        else:  # codes 30 / 31 assembled at bit 12 (low two bits from plane 0 / 1, high bit from plane 2)
            if I == 30:
                c = ((w0 >> 18) & (3 << 12)) | ((w2 >> 16) & (4 << 12))
            else:
                c = ((w1 >> 18) & (3 << 12)) | ((w2 >> 17) & (4 << 12))
            v, bias = _biased(c, 12, 3, rz)
    else:
        v, bias = _biased(w0, I * BITS, BITS, rz)
    return v, bias


@triton.jit
def _load_unit(ptrs, plane_stride, mask, PLANES: tl.constexpr):
    """int32 words ``[BLOCK_N, 16]`` of one block at ``ptrs``: ``w0``, and for 3 bits the other two
    planes ``plane_stride`` words on (``w1``/``w2``; otherwise ``w0`` again, unused by ``_slot``)."""
    w0 = tl.load(ptrs, mask=mask, other=0)
    if PLANES == 3:
        w1 = tl.load(ptrs + plane_stride, mask=mask, other=0)
        w2 = tl.load(ptrs + 2 * plane_stride, mask=mask, other=0)
    else:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _load_x(ptrs, mask, UNMASKED: tl.constexpr):
    """Activations as float32 (0 where masked)."""
    if UNMASKED:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scale_zero(sz, ACT: tl.constexpr):
    """int32 (scale | zero << 16) words, act-dtype bit patterns -> (scale, zero) as float32."""
    s = (sz & 0xFFFF).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    z = (sz >> 16).to(tl.int16).to(ACT, bitcast=True).to(tl.float32)
    return s, z


@triton.jit
def _finish(y, offs_n, offs_m, M, N, out_ptr, bias_ptr, ws_ptr, lock_ptr, tile, pid_k, n_split,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Write ``y [BLOCK_N, BLOCK_M]`` (fp32, this program's K range) to ``out[m, n]``."""
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    idx = offs_m[None, :] * N + offs_n[:, None]
    if SPLIT:
        tl.store(ws_ptr + pid_k * M * N + idx, y, mask=mask)
        tl.debug_barrier()  # every thread's partial is issued before the counter moves
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == n_split - 1:  # last program of this tile: reduce in a fixed order
            y = tl.load(ws_ptr + idx, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, n_split):
                y += tl.load(ws_ptr + s * M * N + idx, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, U, blocks_per_split, n_split,
    BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, IPG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr, LOOP_STAGES: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One activation row (program axis 2) x BLOCK_N outputs x one K split, on CUDA cores.

    Loads in flight per thread: BLOCKS_PER_ITER 16-byte weight vectors per iteration (registers),
    times LOOP_STAGES when Triton software-pipelines the loop (1 = not pipelined)."""
    SUB: tl.constexpr = 16
    ACT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_j = tl.arange(0, SUB)
    b0 = pid_k * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, U // SUB)
    w_ptrs = qw_ptr + offs_n[:, None] * U + offs_j[None, :]
    x_row = x_ptr + pid_m * K
    rz = N >> 31  # an opaque 0 (N >= 0): field masks live in registers, see _magic
    acc = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
    for blk in tl.range(b0, b1, BLOCKS_PER_ITER, num_stages=LOOP_STAGES):
        for t in tl.static_range(BLOCKS_PER_ITER):
            b = blk + t
            if BLOCKS_PER_ITER == 1:
                smask = nmask
                klim = K
            else:  # the last iteration may run past b1: mask whole blocks via the limits
                smask = offs_n < tl.where(b < b1, N, 0)
                klim = tl.where(b < b1, K, 0)
            wmask = smask[:, None]
            w0, w1, w2 = _load_unit(w_ptrs + b * SUB, N * U, wmask, PLANES)
            for gi in tl.static_range(GPB):
                szw = tl.load(sz_ptr + (b * GPB + gi) * N + offs_n, mask=smask, other=0)
                s, z = _scale_zero(szw, ACT)
                # per group, for this thread's columns j: xs = sum_i x, xb = sum_i 2^e_i x (row-independent);
                # part starts at -(xb + z xs) so that after the slots part = sum_i (code_i - z) x. The two
                # passes read the same x slices and fields: the compiler merges the loads and drops the
                # unused values (the sm_90 SASS has one x load per slot)
                xs = tl.zeros([SUB], dtype=tl.float32)
                xb = tl.zeros([SUB], dtype=tl.float32)
                for ii in tl.static_range(IPG):
                    k = b * BK + (gi * IPG + ii) * SUB + offs_j
                    xv = _load_x(x_row + k, k < klim, EVEN_K and BLOCKS_PER_ITER == 1)
                    _, bias = _slot_biased(w0, w1, w2, gi * IPG + ii, BITS, rz)
                    xs += xv
                    xb += bias * xv
                part = -(xb[None, :] + z[:, None] * xs[None, :])
                for ii in tl.static_range(IPG):
                    k = b * BK + (gi * IPG + ii) * SUB + offs_j
                    xv = _load_x(x_row + k, k < klim, EVEN_K and BLOCKS_PER_ITER == 1)
                    v, _ = _slot_biased(w0, w1, w2, gi * IPG + ii, BITS, rz)
                    part += v * xv[None, :]
                acc += s[:, None] * part
    y = tl.sum(acc, axis=1)
    _finish(y[:, None], offs_n, pid_m + tl.zeros([1], dtype=tl.int32), M, N, out_ptr, bias_ptr, ws_ptr, lock_ptr,
            pid_m * tl.num_programs(0) + pid_n, pid_k, n_split, HAS_BIAS, SPLIT)


@triton.jit
def _dot_kernel(
    x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, U, blocks_per_split, n_split,
    BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, IPG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
):
    """BLOCK_M activation rows x BLOCK_N outputs x one K split, on tensor cores (``out^T = W x^T``).

    A group's slots go to the MMA in chunks of NSC = min(IPG, 8) slots: one ``[BLOCK_N, 16 * NSC]``
    weight tile (:func:`_slots_tile`) times the ``[16 * NSC, BLOCK_M]`` slice of ``x^T``."""
    SUB: tl.constexpr = 16
    NSC: tl.constexpr = 8 if IPG > 8 else IPG
    ACT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    offs_j = tl.arange(0, SUB)
    offs_c = tl.arange(0, SUB * NSC)
    b0 = pid_k * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, U // SUB)
    w_ptrs = qw_ptr + offs_n[:, None] * U + offs_j[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * K + offs_c[:, None]  # [SUB * NSC, BLOCK_M]: x^T slice
    rz = N >> 31  # an opaque 0 (N >= 0): field masks live in registers, see _magic
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for b in range(b0, b1):
        w0, w1, w2 = _load_unit(w_ptrs + b * SUB, N * U, nmask[:, None], PLANES)
        for gi in tl.static_range(GPB):
            szw = tl.load(sz_ptr + (b * GPB + gi) * N + offs_n, mask=nmask, other=0)
            s, z = _scale_zero(szw, ACT)
            d = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for cc in tl.static_range(IPG // NSC):
                i0 = gi * IPG + cc * NSC
                k0 = b * BK + i0 * SUB
                if EVEN_K:
                    xt = tl.load(x_ptrs + k0, mask=mmask[None, :], other=0.0)
                else:
                    xt = tl.load(x_ptrs + k0, mask=mmask[None, :] & ((k0 + offs_c) < K)[:, None], other=0.0)
                q = _slots_tile(w0, w1, w2, z[:, None], i0, NSC, BITS, rz).to(ACT)
                d = tl.dot(q, xt, d)
            acc += s[:, None] * d
    _finish(acc, offs_n, offs_m, M, N, out_ptr, bias_ptr, ws_ptr, lock_ptr,
            pid_m * tl.num_programs(0) + pid_n, pid_k, n_split, HAS_BIAS, SPLIT)


@triton.jit
def _dequant_kernel(
    qw_ptr, sz_ptr, w_ptr, N, K, U,
    BITS: tl.constexpr, PLANES: tl.constexpr, BK: tl.constexpr, GPB: tl.constexpr, IPG: tl.constexpr,
    BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr,
):
    """``w[n, k] = (code - zero) * scale`` in act dtype, one block of K per program (axis 1)."""
    SUB: tl.constexpr = 16
    ACT: tl.constexpr = w_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_j = tl.arange(0, SUB)
    w_ptrs = qw_ptr + offs_n[:, None] * U + b * SUB + offs_j[None, :]
    w0, w1, w2 = _load_unit(w_ptrs, N * U, nmask[:, None], PLANES)
    for gi in tl.static_range(GPB):
        szw = tl.load(sz_ptr + (b * GPB + gi) * N + offs_n, mask=nmask, other=0)
        s, z = _scale_zero(szw, ACT)
        for ii in tl.static_range(IPG):
            k = b * BK + (gi * IPG + ii) * SUB + offs_j
            v = _slot(w0, w1, w2, z[:, None], gi * IPG + ii, BITS, 0) * s[:, None]
            dst = w_ptr + offs_n[:, None] * K + k[None, :]
            if EVEN_K:
                tl.store(dst, v.to(ACT), mask=nmask[:, None])
            else:
                tl.store(dst, v.to(ACT), mask=nmask[:, None] & (k < K)[None, :])
