"""Mixture-of-experts layers as one ``nn.Linear`` per expert projection.

transformers 5 holds a MoE layer's routed experts as two 3-D parameters (``@use_experts_implementation``):

    gate_up_proj  [E, 2I, H]   expert e's gate rows [e, :I], up rows [e, I:]   (concatenated layout)
    down_proj     [E, H, I]

Everything in vlmptq that finds, names, checks, quantizes and writes weights works on ``nn.Linear``
modules, and vLLM reads a quantized MoE checkpoint per expert (``experts.{e}.gate_proj.weight_packed``,
the names llm-compressor writes too). :func:`unfuse_experts` therefore replaces each such module by an
:class:`UnfusedExperts`, whose ``experts.{e}.{gate_proj,up_proj,down_proj}`` are ordinary linears holding
the same values ([I, H], [I, H], [H, I]), with the same forward: outputs are bit for bit those of
transformers' own eager loop (gate and up still run as one matmul; ``experts_implementation="eager"``,
where a model defaults to ``grouped_mm``, e.g. GLM-4.5V, whose bf16 sums round differently). The router
(``mlp.gate``) is not an ``nn.Linear`` in transformers and stays 16-bit, as vLLM serves it.

Only concatenated gate/up without biases is taken, in the standard layout or transposed (Llama 4, whose
blocks :mod:`vlmptq.models.llama4` converts: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, run as one
``bmm``). Others (gpt-oss' interleaved, transposed experts with biases) are refused by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmptq.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

class ExpertMLP(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, dtype: torch.dtype, device: torch.device):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(gate(x)) * up(x)``: the down projection's input. One matmul for gate and up, as transformers
        computes them, so the result is the fused module's to the bit."""
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(x), self.down_proj.weight)


class UnfusedExperts(nn.ModuleList):
    """Drop-in for a transformers fused-experts module: ``forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, expert by expert as transformers' eager loop. A list of
    :class:`ExpertMLP`, so expert ``e``'s linears are ``<path>.{e}.gate_proj`` etc., as vLLM reads them.

    ``transposed``: the fused tensors it is filled from are ``[E, H, 2I]`` / ``[E, I, H]`` (Llama 4) rather than
    ``[E, 2I, H]`` / ``[E, H, I]``. ``weight_on_input``: the routing weight scales the expert's input, not its
    output (Llama 4; vLLM's ``apply_router_weight_on_input``)."""

    transposed: bool = False
    weight_on_input: bool = False

    @property
    def num_experts(self) -> int:
        return len(self)

    def fill(self, gate_up: torch.Tensor, down: torch.Tensor) -> list[nn.Linear]:
        """Set the experts' weights from the model's fused tensors (copies); returns the linears set."""
        if self.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if tuple(gate_up.shape[:1]) != (len(self),) or gate_up.shape[0] != down.shape[0]:
            raise UnsupportedModelError(f"fused experts of {gate_up.shape[0]} / {down.shape[0]} experts for a block of "
                                        f"{len(self)}")
        i = gate_up.shape[1] // 2
        out = []
        for e, mlp in enumerate(self):
            pairs = ((mlp.gate_proj, gate_up[e, :i]), (mlp.up_proj, gate_up[e, i:]), (mlp.down_proj, down[e]))
            for lin, value in pairs:
                if tuple(value.shape) != tuple(lin.weight.shape):
                    raise UnsupportedModelError(f"expert {e}: a fused tensor gives {tuple(value.shape)} for a "
                                                f"{tuple(lin.weight.shape)} weight")
                lin.weight = nn.Parameter(value.detach().clone().to(lin.weight.dtype), requires_grad=False)
                out.append(lin)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return mix_routed(hidden_states, top_k_index, top_k_weights, len(self), lambda e, x: self[e](x),
                          self.weight_on_input)


def mix_routed(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
               num_experts: int, expert: Callable[[int, torch.Tensor], torch.Tensor],
               weight_on_input: bool = False) -> torch.Tensor:
    """``sum_k top_k_weights[t, k] * expert(top_k_index[t, k], hidden_states[t])`` per token, expert by expert in
    transformers' order (so its eager loop's sums, to the bit): ``hidden_states`` [T, H], the routing [T, k];
    with ``weight_on_input``, ``expert(index, weight * hidden_states[t])`` (Llama 4; the weight cast to the
    activations' dtype first, as transformers and vLLM do). Indices outside ``[0, num_experts)``
    (transformers' padding for expert parallelism) are skipped. The loop reads the routed experts on the host:
    not capturable by CUDA graphs."""
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique().tolist():
        if not 0 <= e < num_experts:
            continue
        pos, rows = torch.where(top_k_index.t() == e)
        weight = top_k_weights[rows, pos, None]
        if weight_on_input:
            y = expert(e, hidden_states[rows] * weight.to(hidden_states.dtype))
        else:
            y = expert(e, hidden_states[rows]) * weight
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module (3-D ``gate_up_proj`` and ``down_proj`` parameters)."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def _check_layout(name: str, module: nn.Module) -> None:
    bad = [what for what, flag in (("transposed weights", getattr(module, "is_transposed", False)),
                                   ("biases", getattr(module, "has_bias", False)),
                                   ("interleaved gate/up rows", not getattr(module, "is_concatenated", True)),
                                   ("no gate projection", not getattr(module, "has_gate", True)))
           if flag]
    if bad or not isinstance(getattr(module, "act_fn", None), nn.Module):
        raise UnsupportedModelError(
            f"{name} ({type(module).__name__}) holds its experts in a layout vlmptq does not quantize yet "
            f"({', '.join(bad) or 'no act_fn module'}); supported: concatenated gate/up [E, 2I, H] and down "
            "[E, H, I] without biases (Qwen3-VL-MoE, Qwen3-MoE, ...)")


def unfuse(module: nn.Module, name: str = "experts", transposed: bool = False,
           weight_on_input: bool = False) -> UnfusedExperts:
    """An :class:`UnfusedExperts` holding copies of ``module``'s values (on the meta device, shapes only);
    ``transposed`` and ``weight_on_input`` as there."""
    _check_layout(name, module)
    gu, down = module.gate_up_proj, module.down_proj
    n, h, two_i = gu.shape if transposed else (gu.shape[0], gu.shape[2], gu.shape[1])
    want = (n, two_i // 2, h) if transposed else (n, h, two_i // 2)
    if two_i % 2 or tuple(down.shape) != want:
        layout = "[E, H, 2I] and [E, I, H]" if transposed else "[E, 2I, H] and [E, H, I]"
        raise UnsupportedModelError(f"{name}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are "
                                    f"not {layout}")
    experts = UnfusedExperts(ExpertMLP(h, two_i // 2, module.act_fn, gu.dtype, torch.device("meta")) for _ in range(n))
    experts.transposed, experts.weight_on_input = transposed, weight_on_input
    experts.fill(gu, down)
    return experts


def replace_modules(layers: nn.ModuleList, match: Callable[[nn.Module], bool],
                    build: Callable[[nn.Module, str], nn.Module]) -> int:
    """Replace every module inside the decoder ``layers`` that ``match`` takes by ``build(module, path inside its
    layer)`` (in place); returns how many."""
    count = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if name and match(module):
                parent, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, attr, build(module, name))
                count += 1
    return count


def unfuse_experts(layers: nn.ModuleList) -> int:
    """Replace every fused-experts module inside the decoder ``layers`` by an :class:`UnfusedExperts`
    (in place); returns how many. One layer's experts are held twice while it is converted."""
    count = replace_modules(layers, is_fused_experts, unfuse)
    if count:
        logger.info("%d mixture-of-experts module(s): each expert's gate/up/down projection is quantized as its own "
                    "linear", count)
    return count


def experts_modules(layer: nn.Module) -> dict[str, UnfusedExperts]:
    """``{path inside layer: module}`` of the layer's unfused experts."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, UnfusedExperts)}


def routers(layer: nn.Module) -> list[str]:
    """Paths (inside ``layer``) of the routers beside its unfused experts: a sibling module whose 2-D ``weight``
    has one row per expert (``mlp.gate``). transformers does not make it an ``nn.Linear``, but vLLM does, and
    would quantize it with the checkpoint's ``Linear`` target: it belongs in the ``ignore`` list."""
    out = []
    for path, experts in experts_modules(layer).items():
        parent = path.rpartition(".")[0]
        owner = layer.get_submodule(parent) if parent else layer
        for name, module in owner.named_children():
            w = getattr(module, "weight", None)
            if module is not experts and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == len(experts):
                out.append(f"{parent}.{name}" if parent else name)
    return out
