"""Capturing what flows into decoder layers and linears. Every hook lives in a context manager that
always removes it; early exits use a private exception so real errors are never swallowed."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by our own hooks to end a forward pass once the wanted input has been seen."""


@dataclass
class Residue:
    """What a model adds to a decoder layer's output before the next layer sees it, at the token rows
    it touches (Qwen3-VL's deepstack: vision features at the image tokens after the first layers)."""

    rows: torch.Tensor  # int64 [R]: positions in the flattened [1 * T] tokens
    values: torch.Tensor  # [R, hidden], the hidden states' dtype

    @staticmethod
    def reaching(hidden_states: torch.Tensor) -> Residue | None:
        """What the model added to a recorder's zeros before the next recorder saw them (its non-zero
        rows, exactly); None if nothing."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        rows = flat.ne(0).any(dim=1).nonzero().squeeze(1)
        return Residue(rows, flat[rows].clone()) if rows.numel() else None

    def add_to(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = hidden_states.clone()
        flat = out.view(-1, out.shape[-1])
        rows = self.rows.to(out.device)
        flat[rows] = (flat[rows].float() + self.values.to(out.device).float()).to(out.dtype)
        return out


@dataclass
class LayerCall:
    """One decoder-layer call: the hidden states and every other argument the model passed."""

    hidden_states: torch.Tensor  # [1, T, hidden]
    kwargs: dict[str, Any]  # position embeddings (M-RoPE for Qwen), attention mask, position ids, ...
    after: Residue | None = None  # what the model adds to this layer's output before the next layer


def _is_carried(obj: Any) -> bool:
    """State a model carries from one decoder layer to later ones in a mapping among their arguments: one object,
    the same for every layer of a forward pass, that layers write and later layers read (Gemma 4's
    ``shared_kv_states``, a ``UserDict``: its last layers reuse the keys and values of earlier ones). Plain dicts
    are arguments, rebuilt by :func:`move_to`; other mutable mappings are carried state, kept by identity."""
    return isinstance(obj, MutableMapping) and not isinstance(obj, dict)


def fork(call: LayerCall, memo: dict[int, Any] | None = None) -> LayerCall:
    """``call`` with its own copy of the state carried between layers (:func:`_is_carried`), taken as it stands:
    a run of the layer on another stream (full precision beside quantized), or a trial run, then writes its own
    copy and reads what the layers before wrote. ``memo`` (one per sample) keeps the copy shared between the
    layers of one sample, as the original is."""
    memo = {} if memo is None else memo

    def forked(v: Any) -> Any:
        if not _is_carried(v):
            return v
        if id(v) not in memo:
            memo[id(v)] = copy.copy(v)
        return memo[id(v)]

    return LayerCall(call.hidden_states, {k: forked(v) for k, v in call.kwargs.items()}, call.after)


def fork_stream(calls: list[list[LayerCall]]) -> list[list[LayerCall]]:
    """``calls[layer][sample]`` for another stream: each sample's carried state copied once, for all its layers."""
    memos: dict[int, dict[int, Any]] = {}
    return [[fork(c, memos.setdefault(si, {})) for si, c in enumerate(per_sample)] for per_sample in calls]


def release_layer(calls: list[list[LayerCall]], li: int, device: torch.device | str) -> None:
    """Layer ``li`` of a stream's ``calls[layer][sample]`` has run: drop its arguments, and move what it wrote into
    the state carried to later layers to ``device`` (in place): the keys and values Gemma 4's last layers reuse are
    written on the compute device, and held per sample until the last layer."""
    for call in calls[li]:
        for v in call.kwargs.values():
            if _is_carried(v):
                for k in list(v):
                    v[k] = move_to(v[k], device)
    calls[li] = []


def move_to(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Move tensors nested in tuples/lists/dicts to ``device``, keeping shared tensors shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(move_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device, memo) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call and returns zeros, so what reaches the next one is
    exactly what the model adds in between (if anything)."""

    def __init__(self, layer: nn.Module, index: int, calls: list[list[LayerCall]], last: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: it must not move with the model
        self._index, self._calls, self._last = index, calls, last

    def __getattr__(self, name: str) -> Any:  # attributes the model loop reads (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:  # Gemma 4 passes its per-layer input by position: kept by name, so a replay passes it by keyword
            signature = inspect.signature(object.__getattribute__(self, "_layer").forward)
            # every argument but the hidden states, by name
            kwargs = dict(list(signature.bind(hidden_states, *args, **kwargs).arguments.items())[1:])
            var_keyword = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
            kwargs.update(kwargs.pop(var_keyword[0], {}) if var_keyword else {})
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        self._calls[self._index].append(LayerCall(hidden_states, kwargs))
        if self._last:
            raise _StopForward
        return torch.zeros_like(hidden_states)


@contextmanager
def record_layer_calls(layers: nn.ModuleList, final_norm: nn.Module | None = None) -> Iterator[list[list[LayerCall]]]:
    """Replace every decoder layer by a recorder for the duration of the block.

    A forward pass through the model then costs only the embeddings (and the vision tower): the
    recorders return zeros, and the last one ends the pass -- or, given the
    text model's ``final_norm``, the norm's input is recorded too (``calls[len(layers)]``, kwargs
    empty) and ends the pass there, so what the model adds after the last layer is seen as well.
    Yields ``calls[layer_index] -> [LayerCall per forward]``; each layer's own arguments are kept
    (Gemma 3, for instance, gives sliding-window and global layers different masks and rotary tables).
    Whatever reaches a recorder other than the previous one's zeros was added by the model between the
    layers (:meth:`Residue.reaching`), exactly: Qwen3-VL's deepstack features in its own bf16 values, so a
    stream that adds them (:func:`advance`) rounds the sum as the model's forward does.
    """
    originals = list(layers)
    calls: list[list[LayerCall]] = [[] for _ in originals] + ([[]] if final_norm is not None else [])
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, calls, last=final_norm is None and i == len(originals) - 1)
    handle = None
    if final_norm is not None:
        def stop_at_norm(_mod: nn.Module, args: tuple) -> None:
            calls[-1].append(LayerCall(args[0], {}))
            raise _StopForward

        handle = final_norm.register_forward_pre_hook(stop_at_norm)
    try:
        yield calls
    finally:
        if handle is not None:
            handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


def run_until_stopped(fn, *args: Any, **kwargs: Any) -> None:
    """Call ``fn``; a :class:`_StopForward` from our hooks ends it normally."""
    try:
        fn(*args, **kwargs)
    except _StopForward:
        pass


class ModelInputs(Protocol):
    inputs: dict[str, torch.Tensor]  # processor output, batch dim 1
    sample_id: str


@contextmanager
def without_layers(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """Detach the decoder layers from ``model`` for the block, so ``model.to()`` leaves them where they are."""
    for parent in model.modules():
        for attr, child in parent.named_children():
            if child is layers:
                setattr(parent, attr, nn.ModuleList())
                try:
                    yield
                finally:
                    setattr(parent, attr, layers)
                return
    raise RuntimeError("decoder layers not found in the model")  # pragma: no cover


def pixels_in(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``inputs`` with floating-point ``pixel_values*`` in the model's ``dtype``: processors return fp32 (Llama 4's:
    bf16) and most vision towers cast them, but not all (Llama 4's does not)."""
    return {k: v.to(dtype) if k.startswith("pixel_values") and torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()}


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, final_norm: nn.Module | None,
                         samples: Sequence[ModelInputs], device: torch.device, offload: torch.device
                         ) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """Run every sample through the model with recorders in place of the decoder layers: only the
    embeddings and the vision tower do any work, on ``device`` (the model without its layers moves there
    for the pass, and back to the CPU). Returns the hidden states entering the first layer per sample
    ([1, T, hidden], on ``offload``) and every layer's calls (``calls[layer][sample]``, their own
    ``hidden_states`` None but the first layer's). What the model adds between two layers (Qwen3-VL's
    deepstack features) is kept with the earlier layer's call (``after``), so any stream propagated with
    :func:`advance` receives it."""
    with without_layers(model, layers):
        model.to(device)
    per_layer: list[list[LayerCall]] = [[] for _ in layers]
    added: set[int] = set()
    try:
        with record_layer_calls(layers, final_norm) as calls, torch.no_grad():
            for s in tqdm(samples, desc="capturing layer inputs", leave=False):
                run_until_stopped(model, **pixels_in(move_to(s.inputs, device), model.dtype), use_cache=False)
                if any(len(c) != 1 for c in calls):
                    raise RuntimeError(f"sample {s.sample_id}: the model did not call each decoder layer once")
                seen = [c.pop() for c in calls]
                memo: dict[int, Any] = {}  # keeps tensors shared between layers shared after the move
                for li in range(len(layers)):
                    c = seen[li]
                    after = Residue.reaching(seen[li + 1].hidden_states) if li + 1 < len(seen) else None
                    if after is not None:
                        added.add(li)
                        after = Residue(after.rows.to(offload), after.values.to(offload))
                    hidden = move_to(c.hidden_states, offload, memo) if li == 0 else None
                    per_layer[li].append(LayerCall(hidden, move_to(c.kwargs, offload, memo), after))
    finally:
        with without_layers(model, layers):
            model.to("cpu")
    if added:
        logger.info("the model adds features to the hidden states after decoder layer(s) %s (e.g. Qwen3-VL's "
                    "deepstack); every stream receives them", sorted(added))
    return [c.hidden_states for c in per_layer[0]], per_layer


@contextmanager
def capture_args(module: nn.Module, stop: bool = True) -> Iterator[list[tuple]]:
    """Record the positional arguments of ``module`` on each call (and end the pass if ``stop``)."""
    seen: list[tuple] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        seen.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        if stop:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def call_layer(layer: nn.Module, call: LayerCall, hidden_states: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Run a decoder layer on ``hidden_states`` with the recorded arguments of ``call``."""
    out = layer(hidden_states.to(device), **move_to(call.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def advance(layer: nn.Module, call: LayerCall, hidden_states: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the next decoder layer receives: this layer's output plus what the model adds in between."""
    out = call_layer(layer, call, hidden_states, device)
    return out if call.after is None else call.after.add_to(out)


def layer_input_of(layer: nn.Module, linear: nn.Module, call: LayerCall, hidden_states: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """The input of ``linear`` (a module inside ``layer``) when the layer runs on ``hidden_states``;
    the layer's forward stops right after it (nothing later in the layer is computed)."""
    return layer_args_of(layer, linear, call, hidden_states, device)[0]


def layer_args_of(layer: nn.Module, module: nn.Module, call: LayerCall, hidden_states: torch.Tensor,
                  device: torch.device) -> tuple:
    """The positional arguments of ``module`` (inside ``layer``) when the layer runs on ``hidden_states``;
    the layer's forward stops there."""
    with capture_args(module) as seen:
        run_until_stopped(call_layer, layer, call, hidden_states, device)
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was never called during the decoder layer's forward")
    return seen[0]


def input_sharing_groups(layer: nn.Module, call: LayerCall, device: torch.device, names: list[str],
                         units: Sequence[str] = ()) -> list[list[str]]:
    """Group the linears ``names`` of ``layer`` by the tensor they read, in call order.

    q/k/v read the same normed hidden states, gate/up the same MLP input: each group shares one
    Hessian. Found by running the layer once and comparing the input tensors' storage, so fused
    layouts (qkv_proj) and unusual orders need no per-architecture table. ``units``: modules (paths in
    ``layer``) handled as a whole, such as a mixture-of-experts block's experts; each is a group of its
    own, ``[path]``, at the place of its first call.
    """
    order: list[tuple[str, torch.Tensor | None]] = []
    handles = []
    for name in [*names, *units]:
        def hook(_mod, args, _name=name):
            order.append((_name, args[0] if _name in names else None))
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_layer(layer, call, call.hidden_states, device)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    keys: list[torch.Tensor | None] = []
    for name, x in order:
        if x is None:  # a unit
            if [name] not in groups:
                keys.append(None)
                groups.append([name])
            continue
        for gi, key in enumerate(keys):
            if key is not None and (x is key or (x.data_ptr() == key.data_ptr() and x.shape == key.shape)):
                if name not in groups[gi]:
                    groups[gi].append(name)
                break
        else:
            keys.append(x)
            groups.append([name])
    missing = [n for n in [*names, *units] if not any(n in g for g in groups)]
    if missing:
        raise RuntimeError(f"modules {missing} were not called in the decoder layer's forward")
    return groups
