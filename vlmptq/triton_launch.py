"""One Triton kernel launch, fully decided (kernel, grid, arguments, constexprs) but not yet run.

Shared by every Triton kernel of the project: the quantizer's (:mod:`vlmptq.quant.search_triton`,
:mod:`vlmptq.solvers.column_loop_triton`) and the serving plugin's (``vllm_plugin.kernels.triton.ops``
imports it as ``KernelLaunch``). A planned launch can be run, or compiled for a GPU architecture on a
machine without one (``vllm_plugin.kernels.triton.aot.compile_launch``; ``tests/unit/test_triton_sm90.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TritonLaunch:
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    meta: dict  # constexprs plus num_warps / num_stages

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)

    def arg(self, name: str) -> Any:
        """The positional argument the kernel calls ``name``."""
        return self.args[self.kernel.arg_names.index(name)]
