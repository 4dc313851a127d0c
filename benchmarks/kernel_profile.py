#!/usr/bin/env python3
"""The launches to look at under Nsight Compute: ours and torch bf16 on a few 7B decoder shapes, one each.

Everything is built and run once first (Triton compiles, cuBLAS picks its kernels), then each case is
launched once inside the NVTX range ``profile``, so ``ncu --nvtx --nvtx-include "profile/"`` sees exactly
one launch per case (ours: the fused GEMM; bf16: cuBLAS's kernels for ``F.linear``). The weights are
random codes in the plugin's layout (``benchmarks/kernels.py``'s checkpoint maker, then ``repack``):
what ncu measures does not depend on the values. ``scripts/gpu_check.sh`` (``PHASES=profile``) runs it as

    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight ... \\
        python3 benchmarks/kernel_profile.py --cases qkv:4:1 gate_up:4:1 gate_up:2:1 gate_up:bf16:1

A case is ``layer:bits:M`` (bits ``bf16`` for torch), or ``layer:bits:1:gemv`` for the CUDA-core decode kernel
(its launch-search shape for those bits); layers as in ``benchmarks/kernels.py``. ``--dry`` runs
the same cases on the CPU under the Triton interpreter with ``kernels.py``'s tiny shapes (a check of this
script, nothing to profile).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kernel_bench  # noqa: E402

from vllm_plugin.kernels.triton.layout import repack  # noqa: E402
from vllm_plugin.kernels.triton.ops import get_locks  # noqa: E402


def build(case: str, dtype: torch.dtype, gen: torch.Generator, dev: str):
    """(label, zero-argument launch) for ``layer:bits:M``."""
    layer, bits, m, *path = case.split(":")
    parts, k, has_bias = (kernel_bench.DRY_LAYERS if DRY else kernel_bench.LAYERS)[layer]
    n = sum(parts)
    x = torch.randn(int(m), k, device=dev, dtype=dtype, generator=gen)
    bias = torch.randn(n, device=dev, dtype=dtype, generator=gen) if has_bias else None
    if bits == "bf16":
        w = torch.randn(n, k, device=dev, dtype=dtype, generator=gen) * 0.02
        return f"{layer} M={m} bf16", lambda: torch.nn.functional.linear(x, w, bias)
    b = int(bits)
    ct = kernel_bench.make_checkpoint(n, k, b, 128, False, dtype, dev, gen)["ct"]
    qw, sz, _ = repack(ct["weight_packed"], ct["weight_scale"], ct["weight_zero_point"], b, k, dtype)
    locks = get_locks(qw.device)
    if path == ["gemv"]:
        from vllm_plugin.kernels.triton.configs import KernelConfig
        from vllm_plugin.kernels.triton.ops import launch

        bn, warps, stages = kernel_bench.GEMV_SHAPES[b][0]
        cfg = KernelConfig("gemv", block_n=bn, num_warps=warps, num_stages=stages)
        return f"{layer} M={m} w{b} gemv", lambda: launch(x, qw, sz, bias, locks, b, n, cfg)
    return f"{layer} M={m} w{b}", lambda: torch.ops.vlmptq.wna16_gemm(x, qw, sz, bias, locks, b, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["qkv:4:1", "gate_up:4:1", "gate_up:2:1", "gate_up:bf16:1"],
                    help="layer:bits:M (bits: 2, 3, 4 or bf16)")
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks this script")
    args = ap.parse_args()
    if not DRY and not torch.cuda.is_available():
        raise SystemExit("kernel_profile.py needs a CUDA GPU (it is the ncu driver of scripts/gpu_check.sh); "
                         "--dry checks it on the CPU")
    import vllm_plugin.kernels.triton.ops  # noqa: F401  (registers torch.ops.vlmptq.wna16_gemm)

    dev = "cpu" if DRY else "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = [build(c, torch.bfloat16, gen, dev) for c in args.cases]
    for _, run in cases:  # compile and warm outside the profiled range
        for _ in range(1 if DRY else 3):
            run()
    for label, run in cases:
        if not DRY:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push("profile")
        y = run()
        if not DRY:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        print(f"profiled: {label} -> {tuple(y.shape)} finite={bool(torch.isfinite(y).all())}", flush=True)


if __name__ == "__main__":
    main()
