"""Solvers: GPTQ, GPTAQ and VLM-PTQ as pure tensor functions, and the registry the pipeline uses."""

from vlmptq.solvers import methods as _methods  # noqa: F401  (registers rtn/gptq/gptaq/vlmptq)
from vlmptq.solvers.base import DEFAULT_MU_GRID, Solver, SolverOptions, StatsRequest
from vlmptq.solvers.gptq import SolveResult, gptq_quantize
from vlmptq.solvers.modality import choose_modality_params, layer_loss
from vlmptq.solvers.registry import SOLVERS, build_solver, register_solver

__all__ = [
    "DEFAULT_MU_GRID", "SOLVERS", "Solver", "SolverOptions", "SolveResult", "StatsRequest",
    "build_solver", "choose_modality_params", "gptq_quantize", "layer_loss", "register_solver",
]
