"""TF32 tensor cores for the solvers' ``K^3``-sized products on CUDA.

GPTAQ's ``A``/``P`` rows, the P term's share of the lazy block updates and VLM-PTQ's ``mu`` scores cost
``4 K^3 / 3``, ``N K^2`` and ``2 (M + 1) rows K^2`` flops per layer; for a 7B down_proj (``K = 18944``,
``N = 3584``, 1792 scored rows, 7 ``mu``) that is 9.1e12 + 1.3e12 + 1.0e13 = 2.1e13 flops (the A/P
rows' column chunks in ``gptq._asym_rows`` skip ~3/8 of the first), about 0.3 s at an H100's fp32 rate
(67 TFLOPS) and 16x GPTQ's own lazy updates (``N K^2``, fp32): VLM-PTQ's whole overhead, which TF32
tensor cores (~7x the fp32 rate) cut to the order of 50 ms.
Emulated on the CPU (``benchmarks/solver_tf32.py``: operands rounded to 10 mantissa bits, 20 synthetic
layers x W2/W3/W4): the asymmetric loss moves by -0.04% to +0.09% on average per method and bit width
(extremes -1.1% / +1.1% on single layers, either sign), the searched ``mu`` never changes, 0.3-4% of codes
differ. GPTQ's own column loop and lazy updates stay in full fp32. No effect on the CPU or in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def tf32_products(device: torch.device) -> Iterator[None]:
    """fp32 matmuls on CUDA use TF32 inside the block; the previous setting is restored after."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has the per-backend API; mixing it with the legacy flag is an error there
    key, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    prev = getattr(matmul, key)
    setattr(matmul, key, value)
    try:
        yield
    finally:
        setattr(matmul, key, prev)
