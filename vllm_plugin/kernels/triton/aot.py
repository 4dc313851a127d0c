"""Compile the Triton kernels for a GPU architecture on a machine that has no GPU.

Triton lowers through LLVM to PTX and assembles with its bundled ``ptxas``; none of that needs a
GPU. Only picking the target and launching go through a driver, so :func:`compile_launch` swaps in
one that names a target (default ``sm_90``: H100 / H200) and never launches, and compiles exactly
the :class:`~.ops.KernelLaunch` that :func:`~.ops.plan_launch` decides for a shape and config (use
meta-device tensors), with the specialization the JIT applies on a GPU (tensors 16-byte aligned,
integers divisible by 16 marked as such). What comes back is the real cubin; :func:`resource_usage`
reads registers / spills / shared memory with ``cuobjdump`` and :func:`sass` disassembles it with
``nvdisasm`` (both ship with Triton's NVIDIA backend).

This catches what the Triton interpreter cannot (lowering failures, register spills, loads that did
not vectorize) before GPU time is spent. Used by ``benchmarks/kernel_static.py`` and
``tests/unit/test_triton_sm90.py``. Must run without ``TRITON_INTERPRET`` (the interpreter replaces
the kernels with Python functions at import).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_plugin.kernels.triton import ops
from vllm_plugin.kernels.triton.configs import KernelConfig
from vllm_plugin.kernels.triton.layout import kernel_shapes
from vllm_plugin.kernels.triton.ops import KernelLaunch

H100_ARCH = 90


class AotUnavailable(RuntimeError):
    """This Triton build cannot compile for NVIDIA GPUs here (no CUDA backend or no ptxas)."""


class _CompileOnlyDriver:
    """Enough of a Triton driver for ``JITFunction.warmup``: a target, no device, no launches.
    The device key is a string no real driver returns, so the JIT's per-device caches never mix
    these kernels with ones compiled for a real GPU in the same process."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"vlmptq-aot-sm{arch}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def _compile_only(arch: int):
    import triton
    from triton.runtime import driver

    if not hasattr(driver, "set_active") or "nvidia" not in triton.backends.backends:
        raise AotUnavailable(f"triton {triton.__version__} here has no NVIDIA backend to compile with")
    previous = getattr(driver, "_active", None)
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def compile_launch(launch: KernelLaunch, arch: int = H100_ARCH):
    """The ``CompiledKernel`` (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata``) of ``launch``."""
    from vllm_plugin.kernels.triton import kernels

    if not hasattr(launch.kernel, "warmup") or not hasattr(kernels._mma_kernel, "device_caches"):
        raise AotUnavailable("the kernels are interpreted (TRITON_INTERPRET=1 at import); "
                             "compile in a process without it")
    with _compile_only(arch):
        return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)


def meta_launch(bits: int, n: int, k: int, m: int, cfg: KernelConfig, bias: bool = False, group: int = 128,
                dtype: torch.dtype = torch.bfloat16, arch: int = H100_ARCH, sms: int | None = None) -> KernelLaunch:
    """The launch :func:`ops.launch` makes for this shape and ``cfg`` on a GPU of compute capability
    ``arch`` (x 10; its shared-memory budget) with ``sms`` multiprocessors (default: an H100's 132),
    built on meta tensors."""
    q_shape, sz_shape = kernel_shapes(bits, n, k, group)
    q = torch.empty(q_shape, dtype=torch.int32, device="meta")
    sz = torch.empty(sz_shape, dtype=torch.int32, device="meta")
    x = torch.empty((m, k), dtype=dtype, device="meta")
    b = torch.empty((n,), dtype=dtype, device="meta") if bias else None
    locks = torch.empty((ops.LOCKS_SIZE,), dtype=torch.int32, device="meta")
    launch, _ = ops.plan_launch(x, q, sz, b, locks, bits, n, cfg, ops.geometry(bits, k, q, sz), arch, sms)
    return launch


def meta_moe_launch(bits: int, n: int, k: int, experts: int, rows: int, cfg: KernelConfig, group: int = 128,
                    dtype: torch.dtype = torch.bfloat16, down: bool = False, sort: bool = True) -> KernelLaunch:
    """The fused MoE path's grouped launch (:func:`.moe.plan_moe_launch`) for ``experts`` experts of ``[n, k]``
    and ``rows`` routed rows (top-8 routing), on meta tensors: the gate/up launch (SiLU-and-multiply epilogue)
    or, ``down``, the down launch (routing weights applied)."""
    from vllm_plugin.kernels.triton.moe import block_capacity, plan_moe_launch

    q_shape, sz_shape = kernel_shapes(bits, n, k, group)
    meta = dict(device="meta")
    i32 = dict(dtype=torch.int32, **meta)
    cap = block_capacity(rows, experts, cfg.block_m) if sort else rows
    return plan_moe_launch(torch.empty((rows, k), dtype=dtype, **meta), torch.empty((experts, *q_shape), **i32),
                           torch.empty((experts, *sz_shape), **i32),
                           torch.empty((rows, n if down else n // 2), dtype=dtype, **meta),
                           torch.empty((cap * cfg.block_m,), **i32), torch.empty((cap,), **i32),
                           torch.empty((1,), **i32),
                           torch.empty((rows,), dtype=torch.float32, **meta) if down else None,
                           1 if down else 8, bits, cfg, sort, gated=not down)


def weights_per_iteration(launch: KernelLaunch) -> int:
    """Weights one iteration of one program's main K loop covers (one layout block of BLOCK_N rows)."""
    return launch.meta["BLOCK_N"] * launch.meta["BK"]


def instructions_per_weight(launch: KernelLaunch, loop: list[str]) -> float:
    """SASS instructions issued per weight by the main loop ``loop`` (:func:`hot_loop`) of ``launch``:
    per-thread loop length x threads per program / weights per iteration."""
    return len(loop) * launch.meta["num_warps"] * 32 / weights_per_iteration(launch)


def _tool(name: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise AotUnavailable(f"{name} not found at {path} (Triton's NVIDIA backend ships it)")
    return path


def _run_on_cubin(tool: str, flags: list[str], cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "kernel.cubin"
        f.write_bytes(cubin)
        return subprocess.run([str(_tool(tool)), *flags, str(f)], check=True, capture_output=True,
                              text=True).stdout


@dataclass(frozen=True)
class ResourceUsage:
    registers: int  # per thread
    stack: int  # bytes per thread (spills and local arrays land here or in local)
    local: int
    static_shared: int  # bytes per block, declared in the kernel
    dynamic_shared: int  # bytes per block, requested by Triton at launch (pipeline buffers, layouts)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def resource_usage(compiled) -> ResourceUsage:
    text = _run_on_cubin("cuobjdump", ["--dump-resource-usage"], compiled.asm["cubin"])
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"cannot read resource usage from cuobjdump output:\n{text}")
    return ResourceUsage(registers=int(found["REG"]), stack=int(found.get("STACK", 0)),
                         local=int(found.get("LOCAL", 0)), static_shared=int(found.get("SHARED", 0)),
                         dynamic_shared=int(compiled.metadata.shared))


def sass(compiled) -> str:
    """The kernel's SASS as nvdisasm prints it (one instruction per line, branch targets labelled)."""
    return _run_on_cubin("nvdisasm", ["-c"], compiled.asm["cubin"])


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L\w+):")


def hot_loop(sass_text: str) -> list[str]:
    """Opcodes (with modifiers, e.g. ``LDG.E.128``) of the kernel's main K loop: the longest
    *innermost* loop (a backward branch whose span holds no other backward branch). Its body is
    unrolled by ``tl.static_range``, so it is by far the longest; loops around it (the persistent
    kernel's loop over tiles, with the pipeline's prologue and epilogue) are not it. Empty if the
    kernel has no loop."""
    addrs, ops, labels = [], [], {}
    pending: list[str] = []
    for line in sass_text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = len(ops)
        pending = []
        addrs.append(addr)
        ops.append((m.group(3), m.group(4)))
    loops = []
    for i, (op, rest) in enumerate(ops):
        if op == "BRA":
            target = re.search(r"`\((\.L\w+)\)", rest)
            if target and target.group(1) in labels and labels[target.group(1)] <= i:
                loops.append((labels[target.group(1)], i + 1))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    best = max(inner, key=lambda ab: ab[1] - ab[0], default=(0, 0))
    return [op for op, _ in ops[best[0]:best[1]]]
