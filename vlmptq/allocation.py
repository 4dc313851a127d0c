"""Automatic mixed precision: which bit width each decoder linear takes so that the average is at most a
target (``--target-bits 2.5``) and the summed measured loss (the change of the layers' outputs) is least.

The problem (a multiple-choice knapsack): units u (linears that must share a scheme), each with
``params_u`` weights and a measured loss ``L_u(b)`` per candidate bit width b
(``vlmptq.pipeline.sensitivity``); choose b_u minimising ``sum_u L_u(b_u)`` subject to
``sum_u params_u * b_u <= target * sum_u params_u`` (code bits; the scales and zero points come on top
alike for every choice with the same group size).

Solved exactly by dynamic programming over the budget, in steps of the greatest common divisor of the
units' costs (transformer shapes share large factors: a Qwen2.5-7B layer's four units cost 9, 7, 74 and
37 steps per bit). Where that would take more than ``MAX_CELLS`` steps the costs are rounded *up* to
a coarser step, so the budget still holds and the result is optimal for the rounded costs.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlmptq.errors import ConfigError
from vlmptq.pipeline.sequential import compile_ignore, quantizable_linears
from vlmptq.quant.scheme import WeightScheme

if TYPE_CHECKING:
    from vlmptq.config import QuantizeConfig
    from vlmptq.models.adapters import ModelAdapter
    from vlmptq.models.lazy import LazyLayers
    from vlmptq.pipeline.sensitivity import Unit

logger = logging.getLogger(__name__)

MAX_CELLS = 100_000  # budget resolution: the DP table is units x cells bytes


@dataclass(frozen=True)
class Choice:
    """One unit's options: ``losses[b]`` for each candidate bit width ``b``, and its weight count."""

    params: int
    losses: dict[int, float]


def allocate_bits(units: Sequence[Choice], target_bits: float, fixed_bits: int = 0, fixed_params: int = 0
                  ) -> list[int]:
    """The bit width of each unit minimising the summed loss within the average ``target_bits`` (module
    docstring). ``fixed_bits`` / ``fixed_params``: code bits and weights of linears whose width is already
    chosen (they count in the average). Ties go to fewer bits."""
    if not units:
        return []
    choices = sorted(units[0].losses)
    if any(sorted(u.losses) != choices for u in units):
        raise ValueError("every unit needs a loss for the same candidate bit widths")
    if any(not math.isfinite(v) for u in units for v in u.losses.values()):
        raise ValueError("unit losses must be finite")
    floor_bits = fixed_bits + choices[0] * sum(u.params for u in units)
    total_params = fixed_params + sum(u.params for u in units)
    budget = _check_budget(target_bits, floor_bits, total_params)
    extra = [[(b - choices[0]) * u.params for b in choices] for u in units]
    step = math.gcd(*[c for row in extra for c in row if c]) or 1
    if budget // max(step, 1) > MAX_CELLS:
        step = math.ceil(budget / MAX_CELLS)
    cells = budget // step + 1
    inf = float("inf")
    best = torch.zeros(cells, dtype=torch.float64)  # best[c]: least loss of the units so far within c steps
    pick = torch.empty(len(units), cells, dtype=torch.uint8)
    for ui, u in enumerate(units):
        new = torch.full((cells,), inf, dtype=torch.float64)
        arg = torch.zeros(cells, dtype=torch.uint8)
        for bi, b in enumerate(choices):
            k = -(-extra[ui][bi] // step)  # ceil: rounded costs never overspend
            if k >= cells:
                continue
            cand = torch.full((cells,), inf, dtype=torch.float64)
            cand[k:] = best[:cells - k] + u.losses[b]
            better = cand < new
            new = torch.where(better, cand, new)
            arg[better] = bi
        best, pick[ui] = new, arg
    chosen = []
    c = cells - 1
    for ui in range(len(units) - 1, -1, -1):
        bi = int(pick[ui, c])
        chosen.append(choices[bi])
        c -= -(-extra[ui][bi] // step)
    return chosen[::-1]


def _check_budget(target_bits: float, floor_bits: int, total_params: int) -> int:
    """The code bits left above ``floor_bits`` (every linear at its fewest) within the target; an error if
    none are."""
    budget = math.floor(target_bits * total_params + 1e-9 * total_params) - floor_bits
    if budget < 0:
        raise ConfigError(f"--target-bits {target_bits:g} is below what the linears take at the fewest bits "
                          f"({floor_bits / max(total_params, 1):.3f} code bits per weight, the --override'n "
                          "linears included); raise it or lower the smallest --bits-choices")
    return budget


# ----------------------------------------------------------------------------- from a model to its allocation
def choose_bits(model: nn.Module, adapter: ModelAdapter, samples: Sequence, config: QuantizeConfig, *,
                lazy_layers: LazyLayers | None = None) -> dict[str, int]:
    """Each decoder linear's bits for ``config.target_bits`` (full module name -> bits; linears an override
    takes, or --ignore keeps, are not in it): the sensitivity pass on ``samples``, then :func:`allocate_bits`
    on the units' losses."""
    from vlmptq.pipeline.sensitivity import measure_sensitivity

    pinned = [re.compile(o.pattern) for o in config.overrides]
    units = measure_sensitivity(
        model, adapter, samples,
        [WeightScheme(b, config.group_size, config.symmetric) for b in config.bits_choices],
        clip_search=config.solver.clip_search, device=config.torch_device(), offload_device=config.offload_device,
        ignore=config.ignore, skip=lambda name: any(rx.search(name) for rx in pinned), lazy_layers=lazy_layers)
    fixed_bits = fixed_params = 0
    if pinned:
        scheme_for = config.scheme_resolver()
        for name, n in pinned_linears(adapter, config):
            fixed_bits += scheme_for(name).bits * n
            fixed_params += n
    bits = allocate_bits([Choice(u.params, u.losses) for u in units], config.target_bits, fixed_bits,
                         fixed_params)
    allocated = {name: b for u, b in zip(units, bits) for name in u.names}
    logger.info("target %.3g bits: %s", config.target_bits,
                describe_allocation(units, bits, fixed_bits, fixed_params))
    return allocated


def check_target_reachable(adapter: ModelAdapter, config: QuantizeConfig) -> None:
    """``config.target_bits`` must leave room for every unpinned linear at the fewest bits, with the linears an
    override pins at theirs; from shapes alone (the skeleton), so a run fails before it loads the model."""
    if config.target_bits is None:
        return
    prefix, layers = adapter.decoder_layers()
    ignore = compile_ignore(config.ignore)
    total = sum(layer.get_submodule(n).weight.numel() for li, layer in enumerate(layers)
                for n in quantizable_linears(layer, f"{prefix}.{li}", ignore)[0])
    scheme_for = config.scheme_resolver()
    pinned = pinned_linears(adapter, config)
    free = total - sum(n for _, n in pinned)
    if not free:
        raise ConfigError(f"--target-bits {config.target_bits:g}: the --override patterns take every decoder linear, "
                          "so there is nothing left to allocate; drop --target-bits or the override that takes all")
    _check_budget(config.target_bits, sum(scheme_for(name).bits * n for name, n in pinned)
                  + config.bits_choices[0] * free, total)


def pinned_linears(adapter: ModelAdapter, config: QuantizeConfig) -> list[tuple[str, int]]:
    """(full name, weights) of the decoder linears an ``--override`` takes (their scheme is not allocated);
    linears --ignore keeps are not among them."""
    prefix, layers = adapter.decoder_layers()
    ignore = compile_ignore(config.ignore)
    pinned = [re.compile(o.pattern) for o in config.overrides]
    out = []
    for li, layer in enumerate(layers):
        for name in quantizable_linears(layer, f"{prefix}.{li}", ignore)[0]:
            full = f"{prefix}.{li}.{name}"
            if any(rx.search(full) for rx in pinned):
                out.append((full, layer.get_submodule(name).weight.numel()))
    return out


def describe_allocation(units: Sequence[Unit], bits: Sequence[int], fixed_bits: int = 0, fixed_params: int = 0) -> str:
    """E.g. "2.500 code bits per weight; q_proj/k_proj/v_proj W2 x1 W3 x11 W4 x18; o_proj W2 x9 ...": units
    per bit width by kind (their linears' last name parts)."""
    params = fixed_params + sum(u.params for u in units)
    avg = (fixed_bits + sum(u.params * b for u, b in zip(units, bits))) / max(params, 1)
    kinds: dict[str, Counter] = {}
    for u, b in zip(units, bits):
        leaves = [n.rpartition(".")[2] for n in u.names]
        kinds.setdefault("/".join(leaves), Counter())[b] += 1
    parts = [f"{kind} " + " ".join(f"W{b} x{c[b]}" for b in sorted(c)) for kind, c in kinds.items()]
    return f"{avg:.3f} code bits per weight; " + "; ".join(parts)
