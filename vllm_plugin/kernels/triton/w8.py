"""Triton W8A16 kernels: 8-bit codes read straight from the checkpoint layout.

Why a separate kernel: the 2/3/4-bit kernels build two 16-bit floats from one masked word (the
code lands in the float's mantissa); a bf16 mantissa has 7 bits, so 8-bit codes do not fit. 8-bit
layers are rare in a 2/3/4-bit checkpoint -- the use is an 8-bit ``lm_head`` (``vlmptq quantize
--lm-head-bits 8``), at W2 about a third of a 7B model's decode bytes.

Layout (what :class:`vllm_plugin.kernels.triton_w8.TritonW8A16Kernel` prepares):
    qweight  int32 [N, K/4]   the checkpoint's ``weight_packed`` unchanged: code k of row n is
                              byte k % 4 (bits 8*(k%4)) of word k // 4
    scale    act dtype [N, G] G = K / group (per-channel: G = 1, group = K)
    zero     act dtype [N, G] zero points unpacked (integers 0..255: exact in bf16 and fp16)

* ``_w8_mma_kernel`` (M <= 64): per K tile of BLOCK_K columns, one ``tl.dot`` per byte position J
  of the words (:func:`_w8_byte_dot`: columns ``k0 + 4w + J``), so no reshape stands between the
  loaded words and the MMA; the activations are loaded once per tile (contiguous vectors) and split
  into the four byte positions in registers. A byte becomes the fp32 ``2^23 + code`` with one
  ``prmt`` (:func:`_byte_as_float`); subtracting ``2^23 + zero`` is exact, and ``code - zero`` is an exact
  bf16/fp16 integer, so with one group per tile the row's scale multiplies the dot's fp32 result
  (several groups per tile, e.g. g32: the weights are scaled first; zero point and scale of each
  word's group are broadcast from ``[BN, groups]`` once per tile, or for groups like 96 that do not
  tile evenly looked up per word -- a group is a multiple of 4 columns, so a word never spans two). Grid (N
  tiles, M tiles, K splits); with one split the kernel adds the bias and writes the output, with
  several each split writes fp32 partial sums to ``[SPLIT_K, M, N]`` that the host sums in a fixed
  order (deterministic; no atomics, no memset).
* ``_w8_dequant_kernel`` (larger M): writes ``dequant(W)`` in act dtype (:func:`_w8_tile`, fp32
  arithmetic, one rounding) for a cuBLAS matmul.

Launch shapes: the tuned files' ``w8...`` entries (``benchmarks/kernels.py --tune``), else the
heuristics of :func:`w8_config` (from SASS counts; not timed on a GPU yet).
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from vllm_plugin.kernels.triton.configs import HOPPER, W8Config


@triton.jit
def _w8_tile(qw_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K, G, ACT: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized ``[BLOCK_N, BLOCK_K]`` tile of W (columns k0 .. k0 + BLOCK_K) in ACT; columns at
    or past K are 0. GROUP divides BLOCK_K or BLOCK_K divides GROUP (checked by the host)."""
    offs_w = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    words = tl.load(qw_ptr + offs_n[:, None] * (K // 4) + offs_w[None, :],
                    mask=mask_n[:, None] & (offs_w[None, :] < K // 4), other=0)
    shifts = tl.arange(0, 4) * 8
    codes = (words[:, :, None] >> shifts[None, None, :]) & 0xFF  # [BN, BK/4, 4]: byte j of word w = k 4w + j
    if GROUP >= BLOCK_K:  # one group per row in this tile
        gi = k0 // GROUP
        s = tl.load(s_ptr + offs_n * G + gi, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * G + gi, mask=mask_n, other=0.0).to(tl.float32)
        q = tl.reshape(codes, (BLOCK_N, BLOCK_K)).to(tl.float32)
        w = (q - z[:, None]) * s[:, None]
    else:
        NG: tl.constexpr = BLOCK_K // GROUP
        gi = k0 // GROUP + tl.arange(0, NG)
        gmask = mask_n[:, None] & (gi[None, :] < G)
        s = tl.load(s_ptr + offs_n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32)
        q = tl.reshape(codes, (BLOCK_N, NG, GROUP)).to(tl.float32)
        w = tl.reshape((q - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))
    return w.to(ACT)


@triton.jit
def _byte_as_float(words, zw, J: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``2^23 + byte J`` of each word: one ``prmt`` per weight, byte J of the word and bytes 1-3
    of ``zw`` (fp32 ``2^23 + zero`` with zero < 256, broadcasting to ``words``: bytes 0, 0 and the
    exponent 0x4B), a register already live, so the selector is the immediate (a constant
    0x4B000000 would take the immediate slot and cost a register move per use; shift + and + or
    cost two more instructions). The interpreter cannot run PTX: there integer ops build the same bits."""
    if INTERPRET:
        b = ((words >> (8 * J)) & 0xFF) | 0x4B000000
    else:
        b = tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {0x7650 + J};", "=r,r,r",
                                      [words, zw.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=True, pack=1)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _w8_byte_dot(acc, x, zw, sw, J: tl.constexpr, ACT: tl.constexpr, SCALE_AFTER: tl.constexpr,
                 INTERPRET: tl.constexpr, words):
    """``acc + x[:, k] @ W[:, k]^T`` over the columns k = k0 + 4 w + J of this K tile (byte J of
    every word): no reshape, so the byte tile goes to the MMA without a layout shuffle. ``zw``,
    ``sw``: ``2^23 + zero`` and the scale of each word's group (shape ``[BN, 1]`` or ``[BN, BK/4]``;
    a group is a multiple of 4 columns, so the 4 bytes of a word share it). The code becomes
    ``2^23 + code``; subtracting ``zw`` is exact. SCALE_AFTER: the tile's one scale per row
    multiplies the dot's result (``code - zero`` is an exact bf16/fp16 integer; ``sw`` unused), else
    the weights are scaled first."""
    t = _byte_as_float(words, zw, J, INTERPRET) - zw
    w = t.to(ACT) if SCALE_AFTER else (t * sw).to(ACT)
    return acc + tl.dot(x, tl.trans(w))


@triton.jit
def _w8_mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, G, K_PER_SPLIT,
                   ACT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """``out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n])`` over this program's K split; ``out`` is the
    act-dtype output (SPLIT = 1) or the fp32 workspace ``[SPLIT, M, N]``."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    W4: tl.constexpr = BLOCK_K // 4
    SCALE_AFTER: tl.constexpr = GROUP % BLOCK_K == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_w = k0 // 4 + tl.arange(0, W4)
        words = tl.load(qw_ptr + offs_n[:, None] * (K // 4) + offs_w[None, :],
                        mask=mask_n[:, None] & (offs_w[None, :] < K // 4), other=0)
        # zero point (+ 2^23) and scale of each word's group, shaped to broadcast to the words
        if SCALE_AFTER:  # one group per row in this tile
            zw = tl.load(z_ptr + offs_n * G + k0 // GROUP, mask=mask_n, other=0.0).to(tl.float32)[:, None] + 8388608.0
            sw = tl.load(s_ptr + offs_n * G + k0 // GROUP, mask=mask_n, other=0.0).to(tl.float32)
        elif BLOCK_K % GROUP == 0:  # NG whole groups: word w is in group w // (GROUP / 4)
            NG: tl.constexpr = BLOCK_K // GROUP
            gi = k0 // GROUP + tl.arange(0, NG)
            gmask = mask_n[:, None] & (gi[None, :] < G)
            z = tl.load(z_ptr + offs_n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32) + 8388608.0
            sg = tl.load(s_ptr + offs_n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32)
            zw = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, NG, GROUP // 4)), (BLOCK_N, W4))
            sw = tl.reshape(tl.broadcast_to(sg[:, :, None], (BLOCK_N, NG, GROUP // 4)), (BLOCK_N, W4))
        else:  # a group that neither divides nor is a multiple of the tile (e.g. 96): looked up per word
            gi = (k0 + 4 * tl.arange(0, W4)) // GROUP
            gmask = mask_n[:, None] & (gi[None, :] < G)
            zw = tl.load(z_ptr + offs_n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32) + 8388608.0
            sw = tl.load(s_ptr + offs_n[:, None] * G + gi[None, :], mask=gmask, other=0.0).to(tl.float32)
        # the activations once, contiguous (vector loads), split into the 4 byte positions in registers:
        # [BM, BK] -> [BM, BK/4, 2 (j // 2), 2 (j % 2)]; x_j = column 4 w + j
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < k_end),
                     other=0.0)
        x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, W4, 2, 2)))
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        part = _w8_byte_dot(part, x0, zw, sw, 0, ACT, SCALE_AFTER, INTERPRET, words)
        part = _w8_byte_dot(part, x1, zw, sw, 1, ACT, SCALE_AFTER, INTERPRET, words)
        part = _w8_byte_dot(part, x2, zw, sw, 2, ACT, SCALE_AFTER, INTERPRET, words)
        part = _w8_byte_dot(part, x3, zw, sw, 3, ACT, SCALE_AFTER, INTERPRET, words)
        acc += part * sw[None, :] if SCALE_AFTER else part
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(ACT), mask=mask)
    else:
        tl.store(out_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _w8_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, ACT: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``w_ptr[n, k] = dequant(W)[n, k]`` in ACT (row-major ``[N, K]``)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w = _w8_tile(qw_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, K, G, ACT, GROUP, BLOCK_N, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=mask_n[:, None] & (offs_k[None, :] < K))


def dequant_block_k(group: int, k: int) -> int:
    """K tile of the dequantize kernel: 128 columns unless the group is neither a divisor nor a
    multiple of 128 (e.g. 96): then 32 (the group is a multiple of 32, the kernel's requirement)."""
    if group >= k or group % 128 == 0 or 128 % group == 0:
        return 128
    return 32


@functools.lru_cache(maxsize=4096)
def w8_config(m: int, n: int, k: int, group: int, sms: int, arch: int = HOPPER) -> W8Config:
    """Heuristic launch shape for a GPU with ``sms`` SMs of compute capability ``arch`` x 10, used
    where the tuned files (:mod:`.configs`, keys ``w8g<group>:<N>x<K>``) have none. Fused dot for
    M <= 64, dequantize + cuBLAS above. SASS instructions per weight (2026-11-28, Triton 3.6):

    * K tile 128, or 64 for g64 up to 32 rows so that a tile holds one group (its scale then
      multiplies the dot's result: g64 decode 4.8 with 256-row N tiles vs 6.2 for two groups per tile);
    * decode (16-row M tile) with one group per tile: 16384 weights per tile (g128 and per-channel 4.46
      with 128 x 128, vs 5.34 for 64 x 128); otherwise 8192 (64 x 128, or 128 x 64 at K tile 64):
      wider tiles spill from 32 rows up on sm_90, and so does g32 (several groups per tile) near 230
      registers;
    * sm_8x, 64-row M tile: 128 x 64 with 8 warps (sm_80 9.75 / 11.3 at g128 / g32, 10.8 without FMA
      fusion, 128-142 registers; the sm_90 shape, 64 x 128 with 4 warps, takes 17-21 there and spills
      at g32; 128 x 128 with 8 warps takes 9.1-9.5 but spills under Triton 3.6 without FMA fusion);
    * K split until the grid has two programs per SM (:func:`k_splits`)."""
    if m > 64:
        return W8Config("dequant", block_n=32, block_k=dequant_block_k(group, k), num_stages=1)
    bm = w8_block_m(m)
    bk = 64 if group == 64 and bm <= 32 else 128
    one_group = group % bk == 0 or group >= k  # per-channel: one group whatever K (plan_w8_launch)
    bn = (16384 if bm == 16 and one_group else 8192) // bk
    warps = 4
    if arch < 90 and bm == 64:
        bn, bk, warps = 128, 64, 8
    return W8Config("dot", block_m=bm, block_n=bn, block_k=bk, split_k=k_splits(m, n, k, bm, bn, bk, sms),
                    num_warps=warps)


def w8_block_m(m: int) -> int:
    """Rows per program of the fused kernel (M <= 64): 16, 32 or 64."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def k_splits(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int) -> int:
    """K splits (a power of two, at most 16) until the grid has two programs per SM, each split
    keeping at least two K tiles."""
    tiles = -(-n // bn) * -(-m // bm)
    split = 1
    while split < 16 and tiles * split < 2 * sms and k // (2 * split) >= 2 * bk:
        split *= 2
    return split
