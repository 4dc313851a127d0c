"""How much each decoder layer's output changes when one of its linears is quantized to each candidate
bit width: the data that automatic mixed precision (``vlmptq.allocation``) chooses from.

One pass over the full-precision model, layer by layer like the quantizer (one decoder layer on the
compute device, the calibration hidden states waiting on the offload device):

    calibration samples -> hidden states h entering the first decoder layer
    for each decoder layer:
        y = layer(h)                                          the reference outputs (also the next layer's h)
        for each unit (the linears vLLM fuses, q/k/v and gate/up, or one linear) and candidate scheme s:
            the unit's weights -> RTN(W, s) (the clip-searched grid), the rest of the layer as it is
            loss_s = sum over tokens of ||layer(h) - y||^2 / ||y||^2
        weights back
    -> one Unit per set of linears that must share a scheme, with its loss per candidate

Why this measure: a unit's error matters as far as it moves the residual stream the next layers read
(through their norms, i.e. relative to its size), and through the rest of its own layer (attention's
softmax, the MLP's gate). Measured on real weights (docs/mixed-precision.md), allocating by it beat
allocating by each linear's own output error, absolute (tr(E H E^T)) or relative to tr(W H W^T), and the
best hand rule. Nothing is written back: the model leaves this pass as it came (a lazily loaded layer is
read, measured and put back on the meta device).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmptq.checkpoint.config import VLLM_FUSED_LINEARS
from vlmptq.models.adapters import ModelAdapter
from vlmptq.models.experts import experts_modules
from vlmptq.pipeline.capture import advance, fork
from vlmptq.pipeline.sequential import (
    CalibrationSample, _capture_streams, _final_norm_or_none, compile_ignore, quantizable_linears,
)
from vlmptq.quant.grid import quantize_rtn
from vlmptq.quant.scheme import WeightScheme

if TYPE_CHECKING:
    from vlmptq.models.lazy import LazyLayers

logger = logging.getLogger(__name__)


@dataclass
class Unit:
    """Linears that take one scheme together (a fused q/k/v or gate/up, or a single linear)."""

    names: tuple[str, ...]  # full module names
    layer: int  # decoder layer index
    params: int  # weights, summed over the linears
    losses: dict[int, float] = field(default_factory=dict)  # candidate bits -> the layer's relative output change


def fusion_units(names: Sequence[str], blocks: Sequence[str] = ()) -> list[tuple[str, ...]]:
    """``names`` (module names of one layer, in order) grouped into the sets vLLM serves as one fused layer
    (q/k/v, gate/up, and the linears under each of ``blocks``: a mixture-of-experts block's experts); the others
    alone. Order follows the first member."""
    units: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        siblings = next((s for s in VLLM_FUSED_LINEARS.values() if leaf in s), (leaf,))
        unit = tuple(m for m in (f"{parent}.{s}" if parent else s for s in siblings) if m in names)
        if (block := next((b for b in blocks if name.startswith(b + ".")), None)) is not None:
            unit = tuple(m for m in names if m.startswith(block + "."))
        seen.update(unit)
        units.append(unit)
    return units


def measure_sensitivity(
    model: nn.Module,
    adapter: ModelAdapter,
    samples: Sequence[CalibrationSample],
    candidates: Sequence[WeightScheme],
    *,
    clip_search: bool = True,
    device: torch.device | str = "cpu",
    offload_device: torch.device | str = "cpu",
    ignore: Sequence[str] = (),
    skip: Callable[[str], bool] = lambda name: False,
    lazy_layers: LazyLayers | None = None,
) -> list[Unit]:
    """Every unit's loss at each scheme of ``candidates`` (see the module docstring). ``ignore``: regexes
    of linears kept in 16-bit; ``skip``: linears whose scheme is already chosen (an ``--override``):
    neither is measured nor returned."""
    device, offload = torch.device(device), torch.device(offload_device)
    prefix, layers = adapter.decoder_layers()
    patterns = compile_ignore(ignore)
    scale_dtype = next(model.parameters()).dtype
    streams = _capture_streams(model, layers, _final_norm_or_none(adapter), samples, device, offload, need_fp=False)
    units: list[Unit] = []
    for li in tqdm(range(len(layers)), desc=f"sensitivity ({'/'.join(str(s.bits) for s in candidates)} bits)"):
        if lazy_layers is not None:
            lazy_layers.load(li, layers[li])
        layer = layers[li].to(device)
        lprefix = f"{prefix}.{li}"
        names = [n for n in quantizable_linears(layer, lprefix, patterns)[0] if not skip(f"{lprefix}.{n}")]
        calls = streams.calls[li]
        with torch.no_grad():
            outs = [advance(layer, calls[si], streams.quant[si], device) for si in range(len(samples))]
            for unit in fusion_units(names, list(experts_modules(layer))):
                cost = Unit(tuple(f"{lprefix}.{n}" for n in unit), li,
                            sum(layer.get_submodule(n).weight.numel() for n in unit))
                for scheme in candidates:
                    with _quantized(layer, unit, scheme, scale_dtype, clip_search):
                        cost.losses[scheme.bits] = sum(
                            _relative_change(advance(layer, fork(calls[si]), streams.quant[si], device), outs[si])
                            for si in range(len(samples)))
                logger.debug("%s: %s", cost.names, ", ".join(f"W{b} {v:.4g}" for b, v in cost.losses.items()))
                units.append(cost)
            streams.quant = [out.to(offload) for out in outs]
            streams.done(li, offload)
        layers[li] = layer.to("cpu")
        if lazy_layers is not None:
            lazy_layers.unload(li)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return units


@contextmanager
def _quantized(layer: nn.Module, names: Sequence[str], scheme: WeightScheme, scale_dtype: torch.dtype,
               clip_search: bool) -> Iterator[None]:
    """The linears ``names`` of ``layer`` hold their RTN-quantized weights inside the ``with`` block."""
    lins = [layer.get_submodule(n) for n in names]
    saved = [lin.weight.data for lin in lins]
    try:
        for lin, w in zip(lins, saved):
            lin.weight.data = quantize_rtn(w, scheme, scale_dtype, clip_search=clip_search).dequantize(w.dtype)
        yield
    finally:
        for lin, w in zip(lins, saved):
            lin.weight.data = w


def _relative_change(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum over tokens of ||out - ref||^2 / ||ref||^2."""
    ref = ref.float()
    return ((out.float() - ref).square().sum(-1) / ref.square().sum(-1).clamp_min(1e-30)).sum().item()
