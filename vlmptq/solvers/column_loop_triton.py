"""The GPTQ column loop of one block segment in one kernel launch (CUDA; the Triton interpreter for tests).

On a GPU the torch loop of :func:`vlmptq.solvers.gptq.gptq_quantize` is bound by the host: about 17
PyTorch calls per column, each ~5-10 us of Python and dispatch, while the device is busy for 13-17 %
of the time (torch.profiler on an H200, 7B o_proj: 43-56 ms of device time in ~0.33 s). Inside a block
the rows of ``W`` are independent -- each column step reads and writes only the rows' own values -- so a
program can run the whole recurrence for a tile of rows: one launch per segment (a group's columns
inside a block) instead of ~6 x its width.

Layout (the torch loop's, transposed: row ``i`` of a block is input column ``i1 + i`` of ``W``):
    buf   fp32 [nb, 2, N] the torch loop's interleaved buffer: ``buf[i, 0]`` the current values of the
                         block's column i, updated in place (final -- the pre-quantization value the P term
                         needs -- once the column is done), ``buf[i, 1]`` its error ``w_i - q_i`` (written
                         for the segment's columns)
    codes fp32 [nb, N]   integer codes (written for the segment's columns)
    coef  fp32 [nb, nb, 2] GPTAQ / VLM-PTQ: later column ``c`` += ``coef[i, c, 0] w_i + coef[i, c, 1] e_i``
          fp32 [nb, nb]    GPTQ: ``un`` (``U[i, :] / U_ii``), later column ``c`` -= ``un[i, c] e_i``
    s, z  fp32 [N]       the segment's group scale and zero point
    qmul  fp32 [nb, N]   VLM-PTQ's diagonal correction, ``(1 + C_i) / scale`` per column (DIAG only)
Arithmetic follows the torch loop operation by operation (IEEE division, clamp then round half to even,
``x - (c - z) s``); only fused multiply-adds may round differently, so a code can differ where the
torch loop's value lies within an ulp of a rounding boundary.
"""

from __future__ import annotations

import os

import torch

from vlmptq.triton_launch import TritonLaunch

try:  # triton is optional: without it (or without CUDA) the torch loop runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

FUSED_ENV = "VLMPTQ_FUSED_COLUMN_LOOP"  # "0" keeps the torch loop on CUDA too
BLOCK_N = 64  # rows of W (columns of the transposed block) per program; half that on GPUs it would not fill


def enabled(device: torch.device) -> bool:
    """Whether the fused segment kernel runs for tensors on ``device``: a CUDA GPU of compute capability 8.0
    or newer (what it was compiled and checked for; older cards keep the torch loop), or the interpreter."""
    if triton is None or os.environ.get(FUSED_ENV, "1").strip() in ("0", "false", "no", "off"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    from vlmptq.quant.search_triton import _rint

    @triton.jit
    def _segment_kernel(
        buf_ptr, codes_ptr, coef_ptr, s_ptr, z_ptr, qmul_ptr,
        N, NB, seg0, seg1, maxq,
        B: tl.constexpr, BLOCK_N: tl.constexpr, ASYM: tl.constexpr, DIAG: tl.constexpr,
    ):
        """Columns ``[seg0, seg1)`` of a block of ``NB`` columns for rows ``pid * BLOCK_N ..`` of W: the
        block's ``[B, BLOCK_N]`` values stay in registers; column ``i``'s row is read out by a masked sum,
        quantized, and its error (GPTQ) or value and error (GPTAQ) pushed to the later rows."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, B)
        nmask = offs_n < N
        bmask = offs_b < NB
        tile_off = offs_b[:, None] * (2 * N) + offs_n[None, :]  # buf[b, 0, n]
        tmask = bmask[:, None] & nmask[None, :]
        tile = tl.load(buf_ptr + tile_off, mask=tmask, other=0.0)
        s = tl.load(s_ptr + offs_n, mask=nmask, other=1.0)
        z = tl.load(z_ptr + offs_n, mask=nmask, other=0.0)
        for i in range(seg0, seg1):
            x = tl.sum(tl.where((offs_b == i)[:, None], tile, 0.0), axis=0)  # [BLOCK_N]: column i
            if DIAG:
                t = z + x * tl.load(qmul_ptr + i * N + offs_n, mask=nmask, other=0.0)
            else:
                t = z + tl.math.div_rn(x, s)
            c = _rint(tl.minimum(tl.maximum(t, 0.0), maxq))
            err = x - (c - z) * s
            tl.store(codes_ptr + i * N + offs_n, c, mask=nmask)
            tl.store(buf_ptr + (2 * i + 1) * N + offs_n, err, mask=nmask)  # buf[i, 1]
            later = (offs_b > i) & bmask
            if ASYM:
                cv = tl.load(coef_ptr + (i * NB + offs_b) * 2, mask=later, other=0.0)
                ce = tl.load(coef_ptr + (i * NB + offs_b) * 2 + 1, mask=later, other=0.0)
                tile += cv[:, None] * x[None, :] + ce[:, None] * err[None, :]
            else:
                un = tl.load(coef_ptr + i * NB + offs_b, mask=later, other=0.0)
                tile -= un[:, None] * err[None, :]
        tl.store(buf_ptr + tile_off, tile, mask=tmask)


def run_segment(buf: torch.Tensor, codes: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor, qmul: torch.Tensor | None, seg0: int, seg1: int, maxq: float) -> None:
    """Quantize columns ``[seg0, seg1)`` of a block in place (layouts: module docstring). ``coef`` is
    ``[nb, nb, 2]`` (GPTAQ / VLM-PTQ) or ``[nb, nb]`` (GPTQ); ``qmul`` the diagonal correction's per-column
    factor or None. All fp32, contiguous, on one device."""
    for name, t in (("buf", buf), ("codes", codes), ("coef", coef), ("scale", scale), ("zero", zero), ("qmul", qmul)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"fused column loop: {name} must be contiguous fp32, got {t.dtype} "
                             f"strides {tuple(t.stride())}")
    plan_segment(buf, codes, coef, scale, zero, qmul, seg0, seg1, maxq).run()


def rows_per_program(n: int, device: torch.device) -> int:
    """:data:`BLOCK_N`, or half of it where ``N / BLOCK_N`` programs would leave multiprocessors idle (a 7B
    o_proj's 3584 rows: 56 programs for an H100's 132 SMs). A program runs its segment's columns one after
    another, so a launch lasts as long as one program: while SMs are free, more and shorter programs finish
    sooner."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    if triton.cdiv(n, BLOCK_N) < sms:
        return BLOCK_N // 2
    return BLOCK_N


def plan_segment(buf: torch.Tensor, codes: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, qmul: torch.Tensor | None, seg0: int, seg1: int, maxq: float,
                 block_n: int | None = None) -> TritonLaunch:
    """:func:`run_segment`'s launch, unchecked (meta tensors plan one to compile without a GPU; ``block_n``
    overrides :func:`rows_per_program`)."""
    nb, _, n = buf.shape
    block_n = block_n or rows_per_program(n, buf.device)
    dummy = qmul if qmul is not None else scale
    return TritonLaunch(
        _segment_kernel, (triton.cdiv(n, block_n),),
        (buf, codes, coef, scale, zero, dummy, n, nb, seg0, seg1, float(maxq)),
        dict(B=triton.next_power_of_2(nb), BLOCK_N=block_n, ASYM=coef.dim() == 3, DIAG=qmul is not None,
             num_warps=4),
    )
