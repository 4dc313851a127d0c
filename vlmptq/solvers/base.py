"""What a solver is, what it asks the pipeline for, and its options.

The pipeline never names an algorithm: it reads ``solver.needs`` to decide which statistics to
collect (fp inputs for the asymmetric objective, per-modality diagonals), then calls
``solver.solve(weight, stats, scheme, scale_dtype)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers.gptq import SolveResult
from vlmptq.stats import InputStatistics


@dataclass(frozen=True)
class StatsRequest:
    """Statistics a solver needs for each input-sharing group of linears."""

    hessian: bool = True  # H = 2/N sum X^T X
    fp_inputs: bool = False  # dXXT: needs the full-precision model's inputs X~
    modality: bool = False  # per-modality Hessian diagonals: needs the vision/text token masks


class Solver(Protocol):
    name: str
    needs: StatsRequest

    def solve(
        self, weight: torch.Tensor, stats: InputStatistics | None, scheme: WeightScheme, scale_dtype: torch.dtype
    ) -> SolveResult: ...


DEFAULT_MU_GRID = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


class SolverOptions(BaseModel):
    """Options shared by the solvers. ``None`` means "the method's default"; setting an option the
    chosen method does not use is an error (see :func:`vlmptq.solvers.build_solver`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(128, gt=0, description="columns per lazy-update block")
    damp: float = Field(0.01, gt=0, description="Hessian dampening, fraction of mean(diag H)")
    act_order: bool = Field(False, description="quantize columns by descending diag(H) (static groups)")
    clip_search: bool = Field(True, description="choose group ranges by MSE clip search (else min-max)")
    alpha: float | None = Field(None, ge=0, description="GPTAQ asymmetric-term scale (gptaq, vlmptq: 0.25)")
    correction: Literal["none", "diag", "exact", "target"] | None = Field(
        None,
        description="VLM-PTQ rounding-target correction: 'diag' (the paper's, default), 'exact' (all "
        "remaining columns), 'target' (GPTQ on the least-squares target), 'none'",
    )
    modality: bool | None = Field(None, description="VLM-PTQ modality-aware group parameters (vlmptq: on)")
    mu_grid: tuple[float, ...] | None = Field(None, description="fusion weights searched per layer")
    modality_norm: Literal["mean", "sum"] | None = Field(
        None, description="per-modality diagonals as per-token means or raw sums (vlmptq: 'mean')"
    )

    @field_validator("mu_grid")
    @classmethod
    def _check_mu(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or any(not 0.0 <= m <= 1.0 for m in v)):
            raise ValueError(f"mu_grid must be a non-empty list of values in [0, 1], got {list(v)}")
        return v
