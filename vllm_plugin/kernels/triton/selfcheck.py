"""First-use check of the Triton kernels against the torch reference, on the GPU that will serve.

(Described for the 2/3/4-bit kernel; the 8-bit kernel of :mod:`vllm_plugin.kernels.triton_w8` runs
the same problem through its own paths: M = 1 and 48 fused with K splits, M = 100 and 300
dequantize + cuBLAS.)

Before the plugin hands a layer to the Triton kernel it runs, once per (bits, group, activation
dtype, device), a small random problem through every launch path a model's calls can take -- the
tensor-core loop at the three M tiles (16: unscaled; 64 and 128: scale fused into the tile), tiles
shared between stream-K programs, the CUDA-core decode kernel at M = 1 (the sm_90 default; elsewhere checked
too, since a tuned file may choose it), and the dequantize-then-cuBLAS path -- and compares
the output with :func:`vllm_plugin.kernels.reference.reference_linear` in fp32. It runs the default
launch shapes for its small problem; tuned shapes (``configs/*.json``) compile the same code paths
with other tile sizes and are checked by ``tests/gpu`` and the benchmark's correctness column.

Why: the packed-FMA instructions of the dequantization are inline PTX that only the GPU runs (the
CPU tests emulate that one instruction), and a Triton or driver upgrade can change what the
kernel compiles to. A wrong kernel must never serve silently: a failed check makes
``TritonWNA16Kernel.can_implement`` refuse the layer with the measured error, and the plugin serves
it with the next kernel in the list (the reference) after an error message. Cost: one compile per
launch path (seconds, at model load, cached by Triton across restarts). ``VLMPTQ_KERNEL_SELF_CHECK=0``
skips it.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from vllm_plugin.kernels.triton.layout import repack

# under vLLM's logger tree (a name only: no vLLM import), so a served model's log shows the verdict
logger = logging.getLogger(f"vllm.plugins.{__name__}")

SELF_CHECK_ENV = "VLMPTQ_KERNEL_SELF_CHECK"
# fp32-reference relative error of a correct kernel: output rounding (bf16 2^-9, fp16 2^-12) plus
# summation order; a wrong zero point, lane or scale gives >= 0.1
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# one M per launch path of the default dispatch: the CUDA-core kernel (sm_90; the MMA loop elsewhere), M tile 16
# (unscaled), 64 and 128 (scaled tiles), dequantize + cuBLAS
CHECK_ROWS = (1, 5, 48, 100, 300)
CHECK_N = 320  # not a multiple of the 64/128-row tiles (masked rows); 2 programs per SM share its tiles

_VERDICTS: dict[tuple, str | None] = {}


def self_check_enabled() -> bool:
    return os.environ.get(SELF_CHECK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def self_check(bits: int, group_size: int | None, act_dtype: torch.dtype, device: torch.device | str,
               kernel: str = "triton") -> str | None:
    """``None`` if ``kernel`` ("triton": 2/3/4-bit, "triton_w8", "triton_moe": the fused MoE block) matches the
    reference on ``device`` for this scheme, else why not (cached per process). ``group_size`` None:
    per-channel scales."""
    device = torch.device(device)
    key = (kernel, bits, group_size, act_dtype, str(device))
    if key not in _VERDICTS:
        t0 = time.perf_counter()
        _VERDICTS[key] = _run(bits, group_size, act_dtype, device, kernel)
        what = f"w{bits} {'per-channel' if group_size is None else f'g{group_size}'} {str(act_dtype)[6:]} on {device}"
        if _VERDICTS[key] is None:
            logger.info("vlmptq: %s kernel self-check passed (%s) in %.1f s", kernel, what, time.perf_counter() - t0)
        else:
            logger.error("vlmptq: the %s kernel FAILED its self-check (%s): %s. Layers with this scheme are "
                         "served by the next kernel or MoE path; please report this with the output of "
                         "`pytest %s`.", kernel, what, _VERDICTS[key], _GPU_TESTS[kernel])
    return _VERDICTS[key]


def _wna16(wp, scale, zp, bits, k, act_dtype, device):
    """The 2/3/4-bit kernel on this problem: ``apply(x, bias) -> (y, problem or None)``."""
    from vllm_plugin.kernels.triton import ops

    q, sz, _ = repack(wp.to(device), scale.to(device), zp.to(device), bits, k, act_dtype)
    locks = ops.get_locks(device)

    def apply(x, bias, cfg=None):
        y = ops.launch(x, q, sz, bias, locks, bits, CHECK_N, cfg)
        return y, ("stream-K counters left non-zero" if locks.any() else None)

    return apply


def _w8(wp, scale, zp, bits, k, act_dtype, device):
    from vllm_plugin.kernels import triton_w8

    t = triton_w8.prepare_w8(wp.to(device), scale.to(device), zp.to(device), k, act_dtype)
    return lambda x, bias, cfg=None: (triton_w8.w8_launch(x, t["qweight"], t["scale"], t["zero"], bias), None)


def _extra_paths(kernel: str, bits: int, device: torch.device) -> list[tuple[int, object]]:
    """(M, launch config) checks beyond the default dispatch of :data:`CHECK_ROWS`: the CUDA-core decode
    kernel (with a K split) where the default does not already run it at M = 1, since a tuned file may."""
    if kernel != "triton":
        return []
    from vllm_plugin.kernels.triton.configs import KernelConfig, default_config
    from vllm_plugin.kernels.triton.ops import _device_info

    if default_config(bits, 1, _device_info(str(device))[2]).path == "gemv":
        return []
    return [(1, KernelConfig("gemv", block_n=64, programs=12))]


_KERNELS = {"triton": _wna16, "triton_w8": _w8}
_GPU_TESTS = {"triton": "tests/gpu/test_triton_kernels.py", "triton_w8": "tests/gpu/test_triton_w8.py",
              "triton_moe": "tests/gpu/test_triton_moe_cuda.py"}


def _run(bits: int, group_size: int | None, act_dtype: torch.dtype, device: torch.device,
         kernel: str = "triton") -> str | None:
    try:
        if kernel == "triton_moe":  # a whole expert block, not one linear: its own problem
            from vllm_plugin.kernels.triton.moe import check_fused_moe

            return check_fused_moe(bits, group_size, act_dtype, device, TOLERANCE[act_dtype])
        return _run_linear(bits, group_size, act_dtype, device, kernel)
    except Exception as e:  # a kernel that cannot run here is refused, not fatal
        return f"{type(e).__name__}: {str(e)[:500]}"


def _run_linear(bits: int, group_size: int | None, act_dtype: torch.dtype, device: torch.device,
                kernel: str) -> str | None:
    from vllm_plugin.kernels.reference import reference_linear
    from vlmptq.checkpoint.packing import pack_columns, pack_rows

    k = 1024 if group_size is None else 8 * group_size  # several groups and several K blocks per row
    group = k if group_size is None else group_size
    gen = torch.Generator().manual_seed(1000 * bits + group)
    codes = torch.randint(0, 2**bits, (CHECK_N, k), generator=gen)
    zeros = torch.randint(0, 2**bits, (CHECK_N, k // group), generator=gen)
    scale = ((torch.rand(CHECK_N, k // group, generator=gen) + 0.5) * 0.02).to(act_dtype)
    bias = torch.randn(CHECK_N, generator=gen).to(act_dtype)
    wp, zp = pack_rows(codes, bits), pack_columns(zeros, bits)
    apply = _KERNELS[kernel](wp, scale, zp, bits, k, act_dtype, device)
    for m, cfg in [(m, None) for m in CHECK_ROWS] + _extra_paths(kernel, bits, device):
        x = torch.randn(m, k, generator=gen).to(act_dtype)
        y, problem = apply(x.to(device), bias.to(device), cfg)
        y = y.float().cpu()
        ref = reference_linear(x.float(), wp, scale.float(), zp, bits, k, bias.float())
        at = f"M = {m}" + ("" if cfg is None else f" ({cfg.path} path)")
        if not torch.isfinite(y).all():
            return f"non-finite output at {at}"
        err = ((y - ref).norm() / ref.norm()).item()
        if not err < TOLERANCE[act_dtype]:
            return f"relative error {err:.3g} at {at} (a correct kernel stays below {TOLERANCE[act_dtype]:g})"
        if problem:
            return f"{problem} at {at}"
    return None
