"""Several versions of one model's weights on the same inputs, one decoder layer at a time.

``vlmptq compare`` runs the source model and each quantized checkpoint on the same prompts. Loading each
of them as a whole model would need its weights in host memory and on the device (a 72B model in bf16
does not fit on one 141 GB GPU). Here the model is loaded once (lazily when it would not fit in host
memory, ``vlmptq.models.lazy``), and each *variant* -- the model with some linears' weights replaced,
e.g. by a checkpoint's dequantized ones -- is a stream of hidden states taken through the decoder layers
one layer at a time:

    capture pass     embeddings + vision tower -> the first layer's inputs and every layer's arguments;
                     one pass shared by the variants that leave the modules before the decoder layers
                     alone, and one of its own for a variant that replaces any of them
    every layer      read it (lazily), put it on the device; for each variant: swap its weights in,
                     advance its hidden states through the layer (plus what the model adds between
                     layers, e.g. Qwen3-VL's deepstack features), swap them back; drop the layer
    the end          final norm -> the variant's lm_head -> (final_logit_softcapping) -> log-softmax at
                     the compared positions, one variant at a time

Device memory: one decoder layer (the embeddings and vision tower during the capture pass, the final
norm and lm_head at the end). Host memory: the model (without its decoder layers when loaded lazily),
one layer, and the hidden states, [1, T, hidden] per prompt and variant. The result is the model's own
forward pass (tests/integration/test_compare.py checks every supported family against it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmptq.models.adapters import ModelAdapter
from vlmptq.pipeline.capture import (
    LayerCall, ModelInputs, advance, capture_layer_inputs, fork_stream, release_layer,
)

if TYPE_CHECKING:
    from vlmptq.models.lazy import LazyLayers

WeightSource = Callable[[torch.device], torch.Tensor]  # makes the replacement weight on the device given
LayerHook = Callable[[int, list[list[torch.Tensor]]], None]  # (decoder layer, hidden[variant][sample])


@dataclass
class Variant:
    """The model with the weights of some linears (full module names) replaced."""

    name: str
    weights: Mapping[str, WeightSource] = field(default_factory=dict)


@contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, WeightSource], device: torch.device) -> Iterator[None]:
    """The modules ``weights`` names hold their replacement weights (made on ``device``) for the block."""
    held: dict[str, nn.Parameter] = {}
    try:
        for name, make in weights.items():
            module = model.get_submodule(name)
            w = make(device)
            if w.shape != module.weight.shape or w.dtype != module.weight.dtype:
                raise ValueError(f"{name}: the replacement weight is {tuple(w.shape)} {w.dtype}, the module's "
                                 f"{tuple(module.weight.shape)} {module.weight.dtype}")
            held[name] = module.weight
            module.weight = nn.Parameter(w, requires_grad=False)
        yield
    finally:
        for name, w in held.items():
            model.get_submodule(name).weight = w


@dataclass
class _Plan:
    """A variant's replacements by stage."""

    before: dict[str, WeightSource]  # modules outside the decoder layers and the lm_head
    layers: dict[int, dict[str, WeightSource]]
    head: dict[str, WeightSource]


def _plan(variant: Variant, prefix: str, num_layers: int, head: str) -> _Plan:
    plan = _Plan({}, {}, {})
    for name, make in variant.weights.items():
        index, _, _ = name[len(prefix) + 1:].partition(".") if name.startswith(prefix + ".") else ("", "", "")
        if index.isdigit() and int(index) < num_layers:
            plan.layers.setdefault(int(index), {})[name] = make
        else:
            (plan.head if name == head else plan.before)[name] = make
    return plan


@torch.no_grad()
def variant_logprobs(model: nn.Module, adapter: ModelAdapter, samples: Sequence[ModelInputs],
                     positions: Sequence[torch.Tensor], variants: Sequence[Variant], device: torch.device,
                     lazy: LazyLayers | None = None, on_layer: LayerHook | None = None
                     ) -> Iterator[tuple[Variant, list[torch.Tensor]]]:
    """For each variant in order: its next-token log-probabilities per sample at ``positions`` (bool [T]
    per sample), fp32 [P, vocab] on the CPU. ``lazy``: the decoder layers are still in the checkpoint
    files (read as they come and dropped after). ``on_layer(index, hidden)`` sees every variant's hidden
    states after each decoder layer (``hidden[variant][sample]``, [1, T, hidden] on the CPU). Yields once
    every layer is done, one variant at a time, so only one variant's log-probabilities need be held at
    once (see the module docstring)."""
    prefix, layers = adapter.decoder_layers()
    head_name, head = adapter.lm_head()
    norm = adapter.final_norm()
    cpu = torch.device("cpu")
    plans = [_plan(v, prefix, len(layers), head_name) for v in variants]

    # capture: the first layer's inputs and every layer's arguments, per distinct set of modules before the layers
    hidden: list[list[torch.Tensor]] = []
    calls: list[list[list[LayerCall]]] = []
    shared = None
    for plan in plans:
        if plan.before:
            with swapped_weights(model, plan.before, cpu):  # they move to the device with the model
                h, c = capture_layer_inputs(model, layers, norm, samples, device, cpu)
        else:
            shared = shared or capture_layer_inputs(model, layers, norm, samples, device, cpu)
            h, c = [x.clone() for x in shared[0]], fork_stream(shared[1])  # each variant its own carried state
        hidden.append(h)
        calls.append(c)

    for li in tqdm(range(len(layers)), desc=f"{len(variants)} models, layer by layer"):
        if lazy is not None:
            lazy.load(li, layers[li])
        layer = layers[li].to(device)
        for vi, plan in enumerate(plans):
            with swapped_weights(model, plan.layers.get(li, {}), device):
                for si in range(len(samples)):
                    hidden[vi][si] = advance(layer, calls[vi][li][si], hidden[vi][si], device).to(cpu)
        if on_layer is not None:
            on_layer(li, hidden)
        for c in calls:
            release_layer(c, li, cpu)
        layer.to(cpu)
        if lazy is not None:
            lazy.unload(li)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Gemma 2/3 text models' head and Gemma 4's (in its text config)
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    norm.to(device)
    head.to(device)
    try:
        for vi, (variant, plan) in enumerate(zip(variants, plans)):
            out = []
            with swapped_weights(model, plan.head, device):
                for si, where in enumerate(positions):
                    x = norm(hidden[vi][si].to(device))[0][where.to(device)]  # [P, hidden]
                    logits = head(x)
                    if softcap is not None:
                        logits = torch.tanh(logits / softcap) * softcap
                    out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
            hidden[vi] = []
            yield variant, out
    finally:
        norm.to(cpu)
        head.to(cpu)
