"""Kernel selection: an ordered list of candidates, the first that can take a layer wins.

Each candidate is named and imported lazily, so a kernel whose module cannot be imported here (no
triton, no CUDA, no vLLM C extension) is skipped with the reason instead of breaking the plugin.
``VLMPTQ_DISABLED_KERNELS=name1,name2`` removes kernels by name (for A/B timing or to step around a
broken kernel). When nothing fits, the error lists every candidate with its reason.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass

from vlmptq.errors import ConfigError
from vllm_plugin.kernels.base import WNA16Kernel, WNA16LayerConfig

logger = logging.getLogger(__name__)

DISABLED_KERNELS_ENV = "VLMPTQ_DISABLED_KERNELS"

# (name, "module:Class"), best first. The name is what VLMPTQ_DISABLED_KERNELS matches.
KERNELS: list[tuple[str, str]] = [
    ("triton", "vllm_plugin.kernels.triton_wna16:TritonWNA16Kernel"),
    ("triton_w8", "vllm_plugin.kernels.triton_w8:TritonW8A16Kernel"),
    ("cpu_w4a8", "vllm_plugin.kernels.cpu:CpuW4A8Kernel"),
    ("cpu_wna16", "vllm_plugin.kernels.cpu:CpuWNA16Kernel"),
    ("cpu_w8", "vllm_plugin.kernels.cpu_w8:CpuW8Kernel"),
    ("reference", "vllm_plugin.kernels.reference:ReferenceWNA16Kernel"),
]


# kernels chosen outside this list that VLMPTQ_DISABLED_KERNELS can also name
OTHER_KERNELS = {"triton_moe": "the fused 2/3/4-bit mixture-of-experts path (vllm_plugin/moe.py)"}


class NoKernelError(ConfigError):
    """No kernel in the candidate list can run a layer."""


@dataclass(frozen=True)
class Candidate:
    name: str
    kernel: type[WNA16Kernel] | None  # None: not importable or disabled
    reason: str | None  # why it is unavailable (None when available)


def disabled_kernels() -> set[str]:
    """Kernel names listed in ``VLMPTQ_DISABLED_KERNELS`` (comma separated, spaces ignored)."""
    raw = os.environ.get(DISABLED_KERNELS_ENV, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    known = [n for n, _ in KERNELS] + list(OTHER_KERNELS)
    unknown = names - set(known)
    if unknown:
        raise ConfigError(f"{DISABLED_KERNELS_ENV} names unknown kernel(s) {sorted(unknown)}; "
                          f"known kernels are {known}.")
    return names


def _import(target: str) -> type[WNA16Kernel]:
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def candidates() -> list[Candidate]:
    """Every kernel in preference order, with the reason it is unavailable (if it is)."""
    disabled = disabled_kernels()
    out = []
    for name, target in KERNELS:
        if name in disabled:
            out.append(Candidate(name, None, f"disabled by {DISABLED_KERNELS_ENV}"))
            continue
        try:
            out.append(Candidate(name, _import(target), None))
        except Exception as e:  # a kernel module that fails to import must not break serving
            out.append(Candidate(name, None, f"not importable ({type(e).__name__}: {e})"))
    return out


def choose_kernel_explained(config: WNA16LayerConfig, layer_name: str = "") -> tuple[type[WNA16Kernel], list[str]]:
    """The first candidate whose ``can_implement(config)`` accepts the layer, and why each better
    one did not (``"name: reason"``)."""
    reasons = []
    for c in candidates():
        if c.kernel is None:
            reasons.append(f"{c.name}: {c.reason}")
            continue
        ok, why = c.kernel.can_implement(config)
        if ok:
            return c.kernel, reasons
        reasons.append(f"{c.name}: {why}")
    where = f" for layer {layer_name}" if layer_name else ""
    raise NoKernelError(
        f"no vlmptq kernel can run{where} ({config}):\n  "
        + "\n  ".join(reasons)
        + f"\nRe-enable a kernel (unset {DISABLED_KERNELS_ENV}) or serve the layer unquantized."
    )


def choose_kernel(config: WNA16LayerConfig, layer_name: str = "") -> type[WNA16Kernel]:
    """The first candidate whose ``can_implement(config)`` accepts the layer."""
    return choose_kernel_explained(config, layer_name)[0]


__all__ = [
    "DISABLED_KERNELS_ENV",
    "KERNELS",
    "Candidate",
    "NoKernelError",
    "OTHER_KERNELS",
    "WNA16Kernel",
    "WNA16LayerConfig",
    "candidates",
    "choose_kernel",
    "choose_kernel_explained",
    "disabled_kernels",
]
