"""The four methods of the CLI (rtn, gptq, gptaq, vlmptq) as solvers over the pure functions."""

from __future__ import annotations

import time

import torch

from vlmptq.errors import ConfigError
from vlmptq.quant.grid import quantize_rtn
from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers.base import DEFAULT_MU_GRID, SolverOptions, StatsRequest
from vlmptq.solvers.gptq import SolveResult, gptq_quantize
from vlmptq.solvers.modality import choose_modality_params
from vlmptq.solvers.registry import register_solver
from vlmptq.stats import InputStatistics


def _timed(fn):
    def wrapper(*args, **kwargs) -> SolveResult:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        if result.qweight.codes.is_cuda:
            torch.cuda.synchronize()
        result.seconds = time.perf_counter() - t0
        return result

    return wrapper


@register_solver("rtn", uses=("clip_search",))
class RTNSolver:
    """Round-to-nearest with min-max or clip-searched group ranges; needs no calibration data."""

    name = "rtn"

    def __init__(self, options: SolverOptions):
        self.options = options
        self.needs = StatsRequest(hessian=False)

    @_timed
    def solve(self, weight, stats, scheme: WeightScheme, scale_dtype) -> SolveResult:
        return SolveResult(qweight=quantize_rtn(weight, scheme, scale_dtype, clip_search=self.options.clip_search))


_GPTQ_OPTIONS = ("block_size", "damp", "act_order", "clip_search")


@register_solver("gptq", uses=_GPTQ_OPTIONS)
class GPTQSolver:
    """GPTQ: minimises ||W X - Q X||^2 (symmetric calibration)."""

    name = "gptq"

    def __init__(self, options: SolverOptions):
        self.options = options
        self.needs = StatsRequest(hessian=True)

    def _loop_kwargs(self) -> dict:
        o = self.options
        return dict(block_size=o.block_size, damp=o.damp, act_order=o.act_order, clip_search=o.clip_search)

    @_timed
    def solve(self, weight, stats: InputStatistics, scheme, scale_dtype) -> SolveResult:
        return gptq_quantize(weight, stats.hessian, scheme, scale_dtype=scale_dtype, **self._loop_kwargs())


@register_solver("gptaq", uses=_GPTQ_OPTIONS + ("alpha",))
class GPTAQSolver(GPTQSolver):
    """GPTAQ: minimises ||W X~ - Q X||^2 (asymmetric calibration) through the P term."""

    name = "gptaq"

    def __init__(self, options: SolverOptions):
        super().__init__(options)
        self.alpha = 0.25 if options.alpha is None else options.alpha
        self.needs = StatsRequest(hessian=True, fp_inputs=True)

    @_timed
    def solve(self, weight, stats: InputStatistics, scheme, scale_dtype) -> SolveResult:
        return gptq_quantize(
            weight, stats.hessian, scheme, dxxt=stats.dxxt, alpha=self.alpha, scale_dtype=scale_dtype,
            **self._loop_kwargs(),
        )


@register_solver("vlmptq", uses=_GPTQ_OPTIONS + ("alpha", "correction", "modality", "mu_grid", "modality_norm"))
class VLMPTQSolver(GPTAQSolver):
    """VLM-PTQ: GPTAQ + the rounding-target correction + modality-aware static group parameters."""

    name = "vlmptq"

    def __init__(self, options: SolverOptions):
        super().__init__(options)
        o = options
        self.correction = "diag" if o.correction is None else o.correction
        self.modality = True if o.modality is None else o.modality
        self.mu_grid = DEFAULT_MU_GRID if o.mu_grid is None else o.mu_grid
        self.modality_norm = "mean" if o.modality_norm is None else o.modality_norm
        if self.alpha == 0.0 and o.correction is None:
            self.correction = "none"  # the correction is a multiple of alpha: nothing to correct
        if self.alpha == 0.0 and self.correction != "none":
            raise ConfigError(f"correction={self.correction!r} needs alpha > 0 (it scales with alpha)")
        self.needs = StatsRequest(hessian=True, fp_inputs=True, modality=self.modality)

    @_timed
    def solve(self, weight, stats: InputStatistics, scheme, scale_dtype) -> SolveResult:
        static = None
        info = {}
        if self.modality:
            dv, dt = stats.modality_diagonals(self.modality_norm)
            choice = choose_modality_params(
                weight, stats.hessian, stats.dxxt, dv.to(weight.device), dt.to(weight.device), scheme,
                self.mu_grid, scale_dtype,
            )
            static = (choice.scale, choice.zero)
            info = {"mu": choice.mu, "mu_scores": choice.scores}
        result = gptq_quantize(
            weight, stats.hessian, scheme, dxxt=stats.dxxt, alpha=self.alpha, correction=self.correction,
            static_params=static, scale_dtype=scale_dtype, **self._loop_kwargs(),
        )
        result.info.update(info)
        return result
