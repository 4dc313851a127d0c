"""One Triton launch of the quantizer's kernels, decided but not yet run.

The solvers' kernels (:mod:`vlmptq.quant.search_triton`, :mod:`vlmptq.solvers.column_loop_triton`) plan a
launch -- kernel, grid, arguments, constexprs -- and then run it. Kept apart so the plan can also be compiled
for a GPU architecture on a machine without one (``vllm_plugin.kernels.triton.aot.compile_launch`` takes any
object with these four fields; ``tests/unit/test_triton_sm90.py`` checks the solvers' kernels for spills).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TritonLaunch:
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    meta: dict  # constexprs (and num_warps)

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
