"""Fused clip search on the GPU: every shrink candidate and every column weighting in one pass.

The torch version (:func:`vlmptq.quant.grid.search_params_multi`) makes ~15 passes over the weight
per shrink candidate, 80 candidates per search: on a 7B MLP layer that is the largest cost VLM-PTQ
adds to GPTQ. This kernel reads each weight group once, keeps it in registers while it tries all
candidates, and writes only the winning (scale, zero) per weighting.

Layout: ``w [N, K]`` fp32/bf16/fp16 row-major, ``importances [B, K]`` fp32 (B <= 8), optionally
``mix [M, B]`` fp32 (M <= 8; the weightings are then ``mix @ importances``, each candidate's error
``sum_b mix[m, b] err_b``); one program per (block of ``BR`` rows, group); outputs
``scale, zero [M, N, G]`` fp32 (M = B without ``mix``). Arithmetic matches the torch
version: IEEE division, round-half-to-even, scales rounded to the checkpoint dtype before zero points
and codes (bf16 by bit manipulation, so the Triton interpreter agrees with the GPU), ties keep the
earliest (least shrunk) candidate. Only the summation order of each group's error differs, so a
choice can differ where two candidates' errors tie to the last bits.
"""

from __future__ import annotations

import torch

from vlmptq.triton_launch import TritonLaunch

try:  # triton is optional: without it (or without CUDA) the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

_SCALE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_M = 8


def can_run(w: torch.Tensor, group_len: int, m: int, scale_dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether the fused kernel takes this search (else the torch path runs)."""
    import os

    if triton is None:
        return False, "triton is not installed"
    if not (w.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False, "weights are not on a CUDA device"
    if group_len not in (16, 32, 64, 128, 256):
        return False, f"group length {group_len} is not a power of two in [16, 256]"
    if m > _MAX_M:
        return False, f"{m} weightings or basis rows (at most {_MAX_M})"
    if scale_dtype not in _SCALE_CODES:
        return False, f"scale dtype {scale_dtype}"
    return True, None


if triton is not None:

    @triton.jit
    def _round_scale(s, SCALE_CODE: tl.constexpr, TINY: tl.constexpr):
        s = tl.maximum(s, TINY)
        if SCALE_CODE == 1:  # bf16, round to nearest even on the bit pattern
            b = s.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            s = b.to(tl.float32, bitcast=True)
        elif SCALE_CODE == 2:
            s = s.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
        return tl.maximum(s, TINY)

    @triton.jit
    def _rint(x):
        return (x + 12582912.0) - 12582912.0  # round half to even, exact for |x| < 2^22

    @triton.jit
    def _clip_search_kernel(
        w_ptr, imp_ptr, mix_ptr, shrink_ptr, scale_ptr, zero_ptr, n_rows, k_cols, n_groups, n_basis, n_weightings,
        STEPS: tl.constexpr, MAXQ: tl.constexpr, SYM: tl.constexpr,
        SCALE_CODE: tl.constexpr, TINY: tl.constexpr, NORM2: tl.constexpr, NORM: tl.constexpr,
        GLEN: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, MP: tl.constexpr, MIX: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        g = tl.program_id(1)
        rows = pid_r * BR + tl.arange(0, BR)
        cols = g * GLEN + tl.arange(0, GLEN)
        rmask = rows < n_rows
        w = tl.load(w_ptr + rows[:, None] * k_cols + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        bs = tl.arange(0, BP)
        imp = tl.load(imp_ptr + bs[:, None] * k_cols + cols[None, :], mask=(bs < n_basis)[:, None], other=0.0)
        ms = tl.arange(0, MP)
        if MIX:  # [MP, BP]
            mix = tl.load(mix_ptr + ms[:, None] * n_basis + bs[None, :],
                          mask=(ms < n_weightings)[:, None] & (bs < n_basis)[None, :], other=0.0)
        xmin = tl.minimum(tl.min(w, axis=1), 0.0)
        xmax = tl.maximum(tl.max(w, axis=1), 0.0)
        best = tl.full((BR, MP), float("inf"), tl.float32)
        best_s = tl.zeros((BR, MP), tl.float32)
        best_z = tl.zeros((BR, MP), tl.float32)
        for i in range(STEPS):
            p = tl.load(shrink_ptr + i)
            lo = p * xmin
            hi = p * xmax
            if SYM:
                hi = tl.maximum(-lo, hi)
                lo = -hi
            empty = (lo == 0.0) & (hi == 0.0)
            lo = tl.where(empty, -1.0, lo)
            hi = tl.where(empty, 1.0, hi)
            s = _round_scale(tl.math.div_rn(hi - lo, MAXQ * 1.0), SCALE_CODE, TINY)
            if SYM:
                z = tl.full((BR,), (MAXQ + 1) // 2, tl.float32)
            else:
                z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, s)), 0.0), MAXQ * 1.0)
            q = _rint(tl.math.div_rn(w, s[:, None])) + z[:, None]
            q = tl.minimum(tl.maximum(q, 0.0), MAXQ * 1.0)
            e = tl.abs((q - z[:, None]) * s[:, None] - w)
            if NORM2:
                e = e * e
            else:
                e = tl.exp2(NORM * tl.log2(e))
            err = tl.sum(e[:, None, :] * imp[None, :, :], axis=2)  # [BR, BP]
            if MIX:  # the products, then their sum over the basis (as the torch version)
                err = tl.sum(err[:, None, :] * mix[None, :, :], axis=2)  # [BR, MP]
            better = err < best
            best = tl.where(better, err, best)
            best_s = tl.where(better, s[:, None], best_s)
            best_z = tl.where(better, z[:, None], best_z)
        out = ms[None, :] * (n_rows * n_groups) + rows[:, None] * n_groups + g
        omask = rmask[:, None] & (ms < n_weightings)[None, :]
        tl.store(scale_ptr + out, best_s, mask=omask)
        tl.store(zero_ptr + out, best_z, mask=omask)


def search_params_multi_triton(
    w: torch.Tensor, maxq: int, symmetric: bool, group_len: int, importances: torch.Tensor,
    scale_dtype: torch.dtype, grid: int, max_shrink: float, norm: float, mix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused search; same contract as ``search_params_multi`` (check :func:`can_run` first)."""
    launch, scale, zero = plan_search(w, maxq, symmetric, group_len, importances, scale_dtype, grid, max_shrink,
                                      norm, mix)
    launch.run()
    return scale, zero


def plan_search(
    w: torch.Tensor, maxq: int, symmetric: bool, group_len: int, importances: torch.Tensor,
    scale_dtype: torch.dtype, grid: int, max_shrink: float, norm: float, mix: torch.Tensor | None = None,
) -> tuple[TritonLaunch, torch.Tensor, torch.Tensor]:
    """The search's launch and its (still empty) ``scale, zero [M, N, G]`` outputs; meta tensors plan a
    launch to compile without a GPU."""
    n, k = w.shape
    b = importances.shape[0]
    m = b if mix is None else mix.shape[0]
    groups = k // group_len
    w = w.contiguous()
    imp = importances.to(device=w.device, dtype=torch.float32).contiguous()
    mixt = imp if mix is None else mix.to(device=w.device, dtype=torch.float32).contiguous()
    scale = torch.empty(m, n, groups, device=w.device, dtype=torch.float32)
    zero = torch.empty_like(scale)
    bp = max(2, triton.next_power_of_2(b))
    mp = bp if mix is None else max(2, triton.next_power_of_2(m))
    br = max(1, min(16, 2048 // (group_len * bp)))  # keep the [BR, BP, GLEN] product in registers
    tiny = torch.finfo(scale_dtype).tiny
    steps = int(max_shrink * grid)
    # Shrink factors rounded to fp32 on the host, exactly as torch converts its Python scalars.
    shrinks = torch.tensor([1.0 - i / grid for i in range(steps)], dtype=torch.float32, device=w.device)
    launch = TritonLaunch(
        _clip_search_kernel, (triton.cdiv(n, br), groups),
        (w, imp, mixt, shrinks, scale, zero, n, k, groups, b, m),
        dict(STEPS=steps, MAXQ=maxq, SYM=symmetric, SCALE_CODE=_SCALE_CODES[scale_dtype], TINY=tiny,
             NORM2=norm == 2.0, NORM=float(norm), GLEN=group_len, BR=br, BP=bp, MP=mp, MIX=mix is not None),
    )
    return launch, scale, zero
