"""Llama 4's mixture-of-experts blocks, one ``nn.Linear`` per expert projection.

transformers' ``Llama4TextMoe`` (Scout: every layer; Maverick: every other one) differs from the standard block
that :func:`vlmptq.models.experts.unfuse_experts` converts in three ways:

    experts.gate_up_proj  [E, H, 2I]   transposed: expert e computes ``x @ gate_up_proj[e]``, gate columns first
    experts.down_proj     [E, I, H]    all experts run as one ``bmm`` over every token (unrouted ones scaled to 0)
    router                nn.Linear    top-k logits -> sigmoid scores, which scale the expert's *input*

:class:`Llama4RoutedMoE` replaces such a block with the same forward written out per expert: the router and the
shared expert are the block's own modules, the routed experts an :class:`UnfusedExperts` (``transposed``,
``weight_on_input``) that runs each expert on the tokens routed to it only, scaled by their score, as vLLM's
``apply_router_weight_on_input`` does. So each expert's linears see exactly the inputs vLLM will give them
(calibration), and the outputs match transformers' ``bmm`` to rounding (one matmul per expert instead of a batched
one). Module paths are unchanged: ``feed_forward.experts.{e}.gate_proj`` etc., as vLLM reads them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vlmptq.models.experts import is_fused_experts, replace_modules, unfuse

logger = logging.getLogger(__name__)


class Llama4RoutedMoE(nn.Module):
    """A Llama 4 MoE block with unfused experts: ``forward(hidden) -> (out, router_logits)``, as the block's."""

    def __init__(self, block: nn.Module, name: str):
        super().__init__()
        self.top_k, self.hidden_dim = block.top_k, block.hidden_dim
        self.router, self.shared_expert = block.router, block.shared_expert
        self.experts = unfuse(block.experts, f"{name}.experts", transposed=True, weight_on_input=True)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        scores, logits = self.router(x)  # [T, E]: sigmoid of the top-k logits, 0 elsewhere
        index = torch.topk(logits, self.top_k, dim=1).indices  # the router's own choice (same call, same ties)
        out = self.shared_expert(x)
        out.add_(self.experts(x, index, scores.gather(1, index)))
        return out, logits


def is_llama4_moe(module: nn.Module) -> bool:
    """A transformers ``Llama4TextMoe``: fused experts beside a ``router`` and a ``shared_expert``."""
    experts = getattr(module, "experts", None)
    return (isinstance(experts, nn.Module) and is_fused_experts(experts)
            and isinstance(getattr(module, "router", None), nn.Linear)
            and isinstance(getattr(module, "shared_expert", None), nn.Module))


def unfuse_llama4_moe(layers: nn.ModuleList) -> int:
    """Replace every Llama 4 MoE block (``feed_forward``) inside the decoder ``layers`` by a
    :class:`Llama4RoutedMoE` (in place); returns how many."""
    count = replace_modules(layers, is_llama4_moe, Llama4RoutedMoE)
    if count:
        logger.info("%d Llama 4 mixture-of-experts block(s): each expert's gate/up/down projection is quantized as "
                    "its own linear, calibrated on its routed tokens scaled by their router score", count)
    return count
