"""Registering kernels as torch operators ``torch.ops.vlmptq.<name>`` with fake implementations.

Uses ``torch.library.Library.define/impl`` directly (as vLLM's ``direct_register_custom_op`` does)
rather than ``torch.library.custom_op``: the latter adds ~10 us of Python per call (autograd and
aliasing checks), which at decode batch sizes is as long as a small int4 GEMM itself. The fake
implementation lets torch.compile / CUDA graphs trace through the op without running it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("vlmptq", "FRAGMENT")


def register_op(
    name: str, impl: Callable, fake: Callable, dispatch_key: str = "CompositeExplicitAutograd"
):
    """Define ``vlmptq::name`` with the schema inferred from ``impl``'s annotations; returns the op.

    ``dispatch_key``: "CompositeExplicitAutograd" runs ``impl`` for every device, "CPU" / "CUDA"
    limit it to one. Inputs are never mutated and the output never aliases an input.
    """
    schema = torch.library.infer_schema(impl, mutates_args=())
    _LIB.define(name + schema)
    _LIB.impl(name, impl, dispatch_key)
    torch.library.register_fake(f"vlmptq::{name}", fake, lib=_LIB)
    return getattr(torch.ops.vlmptq, name)
