"""Per-layer input statistics: the Hessian, the asymmetric cross term and per-modality diagonals.

Conventions (one input-sharing group of linears, ``K`` input features):
    X_s   [T_s, K]  inputs of sample ``s`` in the partly quantized model (rows are tokens)
    X~_s  [T_s, K]  the full-precision model's inputs for the same sample (``dX = X~ - X``)
    H      = 2/N * sum_s X_s^T X_s              [K, K] fp32   (N counts samples, not tokens)
    dXXT   = 2/N * sum_s (X~_s - X_s)^T X_s     [K, K] fp32   (SPEC's dX X^T)
    diag_vision_sum = sum over vision tokens of x^2   [K] fp64, with the token count
    diag_text_sum   = sum over text tokens of x^2     [K] fp64, with the token count
Padding never reaches the accumulator (the pipeline runs one unpadded sample at a time; callers that
batch pass only valid rows). ``H`` and ``dXXT`` are kept as running means, so their magnitude does
not grow with the number of samples (safe in fp32 for long calibration runs); the diagonals are
exact fp64 sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmptq.errors import SolverError


@dataclass
class InputStatistics:
    """Finalized statistics for one input-sharing group of linears."""

    hessian: torch.Tensor  # [K, K] fp32
    dxxt: torch.Tensor | None  # [K, K] fp32, None when fp inputs were not collected
    diag_vision_sum: torch.Tensor | None  # [K] fp64
    diag_text_sum: torch.Tensor | None  # [K] fp64
    n_vision_tokens: int
    n_text_tokens: int
    n_samples: int

    def modality_diagonals(self, norm: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(H_vision), diag(H_text))`` as fp32 vectors.

        norm="mean": per-token means of each modality (each modality weighs the same per token
        regardless of how many tokens it has); norm="sum": the raw sums scaled like ``H``
        (``2/N``), so ``diag_v + diag_t == diag(H)``.
        """
        if self.diag_vision_sum is None or self.diag_text_sum is None:
            raise SolverError("modality statistics were not collected for this layer")
        if norm == "mean":
            dv = self.diag_vision_sum / max(self.n_vision_tokens, 1)
            dt = self.diag_text_sum / max(self.n_text_tokens, 1)
        elif norm == "sum":
            dv = self.diag_vision_sum * (2.0 / self.n_samples)
            dt = self.diag_text_sum * (2.0 / self.n_samples)
        else:
            raise ValueError(f"modality norm must be 'mean' or 'sum', got {norm!r}")
        return dv.float(), dt.float()


class StatisticsAccumulator:
    """Accumulates :class:`InputStatistics` one calibration sample at a time."""

    def __init__(self, in_features: int, device: torch.device | str, *, fp_inputs: bool, modality: bool):
        self.k = in_features
        self.device = torch.device(device)
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        self.dxxt = torch.zeros_like(self.hessian) if fp_inputs else None
        self.modality = modality
        self.diag_v = torch.zeros(in_features, dtype=torch.float64, device=self.device) if modality else None
        self.diag_t = torch.zeros_like(self.diag_v) if modality else None
        self.n_vision = 0
        self.n_text = 0
        self.n_samples = 0

    def add(
        self,
        x: torch.Tensor,
        x_fp: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> None:
        """Add one sample. ``x``, ``x_fp``: ``[T, K]`` (or ``[1, T, K]``); masks: bool ``[T]``."""
        x = x.reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        if x.shape[1] != self.k:
            raise SolverError(f"input has {x.shape[1]} features, the layer expects {self.k}")
        if not torch.isfinite(x).all():
            raise SolverError(
                "non-finite values (NaN/Inf) in a linear layer's calibration inputs; the model "
                "overflows in its dtype on this sample (try --dtype float32 or other calibration data)"
            )
        self.n_samples += 1
        n = self.n_samples
        keep = (n - 1) / n
        self.hessian.mul_(keep).addmm_(x.t(), x, alpha=2.0 / n)
        if self.dxxt is not None:
            if x_fp is None:
                raise SolverError("this solver needs full-precision inputs but none were provided")
            dx = x_fp.reshape(-1, self.k).to(self.device, torch.float32) - x
            if dx.shape != x.shape:
                raise SolverError(f"fp inputs {tuple(dx.shape)} and inputs {tuple(x.shape)} differ in shape")
            self.dxxt.mul_(keep).addmm_(dx.t(), x, alpha=2.0 / n)
        if self.modality:
            if vision_mask is None or text_mask is None:
                raise SolverError("this solver needs per-token modality masks but none were provided")
            vm = vision_mask.reshape(-1).to(self.device, torch.bool)
            tm = text_mask.reshape(-1).to(self.device, torch.bool)
            if vm.numel() != x.shape[0] or tm.numel() != x.shape[0]:
                raise SolverError(f"modality masks have {vm.numel()} tokens, inputs have {x.shape[0]}")
            sq = x.double().square()
            self.diag_v += sq[vm].sum(0)
            self.diag_t += sq[tm].sum(0)
            self.n_vision += int(vm.sum())
            self.n_text += int(tm.sum())

    def finalize(self) -> InputStatistics:
        if self.n_samples == 0:
            raise SolverError("no calibration samples reached this layer")
        return InputStatistics(
            hessian=self.hessian, dxxt=self.dxxt, diag_vision_sum=self.diag_v, diag_text_sum=self.diag_t,
            n_vision_tokens=self.n_vision, n_text_tokens=self.n_text, n_samples=self.n_samples,
        )
