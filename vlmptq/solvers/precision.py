"""TF32 tensor cores for the solvers' per-layer ``K^3``-sized products on CUDA.

GPTAQ's ``A``/``P`` rows and VLM-PTQ's ``mu`` scores cost ``O(K^3)`` and ``O(M rows K^2)`` flops
once per layer; for a 7B down_proj (``K = 18944``) that is ~2e13 flops, about half a second at an
H100's fp32 rate, which we estimate (not yet measured) to be comparable to the whole launch-bound
column loop. TF32 tensor cores have about 7x the fp32 rate. Emulated on the
CPU (operands rounded to 10 mantissa bits, 10 synthetic layers x W2/W3): the explicit asymmetric
loss moves by -0.03% on average (at most 0.5% on one layer, either sign), the searched ``mu``
never changes, 0.5% of codes differ (docs/algorithm.md). The column loop and the lazy block
updates, which GPTQ shares, stay in full fp32. No effect on the CPU or in float64.
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
