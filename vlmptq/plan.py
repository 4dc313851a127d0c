"""``vlmptq quantize --dry-run``: what a run would quantize, with which scheme, and how big the
checkpoint will be, from the model's config alone (the model is built on the meta device: no weight
is read, no calibration data is loaded; seconds even for a 72B model).

The same checks as a real run (group sizes the layers can take, ``--ignore`` and ``--override`` that
would split a group vLLM fuses) fail here with the same errors. Sizes are exact for the quantized
linears (``checkpoint.compress.packed_nbytes``, the writer's layout) and count every other tensor at
the model dtype's width, and the tensors of the model's files that transformers does not build (multi-token
prediction layers; the output carries them as they are) at theirs, read from the files' headers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmptq.allocation import check_target_reachable
from vlmptq.checkpoint.carried import UNBUILT, CarriedTensors
from vlmptq.checkpoint.compress import packed_nbytes
from vlmptq.checkpoint.reader import TensorStore
from vlmptq.config import QuantizeConfig, as_config
from vlmptq.models.adapters import ModelAdapter, load_skeleton, read_checkpoint_dtype
from vlmptq.models.source import model_dir_of
from vlmptq.pipeline.sequential import check_model_fits, compile_ignore, quantizable_linears
from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers import build_solver


@dataclass
class SchemeShare:
    """The linears that one scheme covers."""

    scheme: str
    linears: int
    params: int
    nbytes: int
    example: str  # the first of them, e.g. model.language_model.layers.0.self_attn.q_proj


@dataclass
class QuantizationPlan:
    model: str
    model_type: str
    dtype: torch.dtype
    decoder_layers: int
    shares: list[SchemeShare]
    kept_linears: list[str]  # decoder linears --ignore keeps in 16-bit
    other_params: int  # everything else (embeddings, norms, vision tower, projector, 16-bit lm_head)
    total_params: int = 0  # every parameter of the model as loaded
    layer_params: int = 0  # those of the decoder layers
    largest_layer_params: int = 0
    calib_bytes: int = 0  # upper bound of the calibration hidden states held between layers
    calib_desc: str = ""
    carried: tuple[str, ...] = ()  # tensors of the files the model does not hold, carried unchanged
    carried_bytes: int = 0
    weights_seen: bool = True  # the folder holds the weight files (a Hub id is planned from its config alone)

    @property
    def quantized_params(self) -> int:
        return sum(s.params for s in self.shares)

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return sum(s.nbytes for s in self.shares) + itemsize * self.other_params + self.carried_bytes

    def format(self) -> str:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        total16 = itemsize * (self.quantized_params + self.other_params) + self.carried_bytes
        width = max(len(s.scheme) for s in self.shares) if self.shares else 6
        lines = [f"model       {self.model} ({self.model_type}, {self.decoder_layers} decoder layers, "
                 f"{str(self.dtype).removeprefix('torch.')})", "",
                 f"{'scheme':<{width}}  {'linears':>7}  {'params':>14}  {'bytes':>15}  {'bits/w':>6}  first"]
        for s in self.shares:
            lines.append(f"{s.scheme:<{width}}  {s.linears:>7}  {s.params:>14,d}  {s.nbytes:>15,d}  "
                         f"{8 * s.nbytes / s.params:>6.3f}  {s.example}")
        if any(s.scheme.startswith("auto ") for s in self.shares):
            lines += ["auto: each linear's bits are chosen at run time by a sensitivity pass (--target-bits); the "
                      "size assumes the budget is filled"]
        lines += ["", f"16-bit: {len(self.kept_linears)} decoder linears kept by --ignore"
                      + (f" ({', '.join(self.kept_linears[:3])}{', ...' if len(self.kept_linears) > 3 else ''})"
                         if self.kept_linears else "")
                  + f"; {self.other_params:,d} other parameters (embeddings, norms, routers and gates, vision tower, "
                    "projector"
                  + (", lm_head" if not any(s.scheme.startswith("lm_head") for s in self.shares) else "") + ")",
                  *self._carried_lines(),
                  f"checkpoint  {_size(self.nbytes)} ({total16 / self.nbytes:.2f}x smaller than {_size(total16)} "
                  f"at 16 bits)"]
        lines += self._memory_lines(itemsize)
        return "\n".join(lines)

    def _carried_lines(self) -> list[str]:
        if not self.weights_seen:
            return ["carried: not counted, no safetensors files here to read their names from (e.g. a Hub model "
                    "planned from its config alone): tensors of the files that the model does not build, e.g. "
                    "multi-token-prediction layers, are written as they are"]
        if not self.carried:
            return []
        return [f"carried: {len(self.carried)} tensors of the model's files that transformers does not build "
                f"({self.carried[0]}, ...), {_size(self.carried_bytes)}, written as they are (16-bit, in ignore)"]

    def _memory_lines(self, itemsize: int) -> list[str]:
        """Host memory for weights and codes: the whole model loaded, or --lazy-load's rest of the model
        plus the current layer; the packed codes (what the checkpoint's quantized part weighs) accumulate
        in both. Activations come on top: an upper bound of the calibration hidden states."""
        if not self.total_params:
            return []
        codes = sum(s.nbytes for s in self.shares)
        lazy = itemsize * (self.total_params - self.layer_params + self.largest_layer_params)
        lines = [f"host memory {_size(itemsize * self.total_params)} (the model) + up to {_size(codes)} of packed "
                 f"codes; with --lazy-load {_size(lazy)} (the model without its decoder layers, plus the largest) "
                 f"+ the same codes"]
        if self.calib_bytes:
            lines.append(f"            + the calibration hidden states held between layers, at most "
                         f"{_size(self.calib_bytes)} ({self.calib_desc})")
        return lines


def check_fits(adapter: ModelAdapter, config: QuantizeConfig) -> None:
    """What a run checks of ``config`` against the model's structure (``adapter``: the skeleton is enough):
    ``check_model_fits`` with the config's patterns and schemes, and room for ``target_bits``."""
    check_model_fits(adapter, config.ignore, config.scheme_resolver(), config.head_scheme,
                     [o.pattern for o in config.overrides])
    check_target_reachable(adapter, config)


def plan(model: str | Path, config: QuantizeConfig | Mapping | None = None) -> QuantizationPlan:
    """The :class:`QuantizationPlan` of ``vlmptq.quantize(model, ..., config)``."""
    config = as_config(config)
    model_dir = model_dir_of(model, config_only=True)
    dtype = config.torch_dtype(read_checkpoint_dtype(model_dir))
    skeleton, adapter = load_skeleton(model_dir, dtype)
    prefix, layers = adapter.decoder_layers()
    patterns = compile_ignore(config.ignore)
    scheme_for = config.scheme_resolver()
    check_fits(adapter, config)
    shares: dict[str, list] = defaultdict(lambda: [0, 0, 0, ""])
    kept: list[str] = []
    itemsize = torch.empty(0, dtype=dtype).element_size()
    quantized_params = 0
    pinned = [re.compile(o.pattern) for o in config.overrides]
    auto = f"auto {'/'.join(f'W{b}' for b in config.bits_choices)} {config.scheme.describe().partition(' ')[2]}"
    pinned_bits = pinned_params = auto_top = 0
    for li, layer in enumerate(layers):
        keep, skipped = quantizable_linears(layer, f"{prefix}.{li}", patterns)
        kept += [f"{prefix}.{li}.{n}" for n in skipped]
        for name in keep:
            full = f"{prefix}.{li}.{name}"
            lin, scheme = layer.get_submodule(name), scheme_for(full)
            label = scheme.describe()
            if config.target_bits is not None:
                if any(rx.search(full) for rx in pinned):
                    pinned_bits, pinned_params = pinned_bits + scheme.bits * lin.weight.numel(), \
                        pinned_params + lin.weight.numel()
                else:
                    label = auto  # scheme: the fewest bits; the codes' extra bits are added below
            _add(shares[label], full, lin.out_features, lin.in_features,
                 packed_nbytes(lin.out_features, lin.in_features, scheme, itemsize))
            quantized_params += lin.weight.numel()
            if label == auto:
                top = WeightScheme(config.bits_choices[-1], config.group_size, config.symmetric)
                auto_top += packed_nbytes(lin.out_features, lin.in_features, top, itemsize)
    if auto in shares:  # the allocation fills the budget; bytes are affine in the bits (codes and zero points)
        share, lo, hi = shares[auto], config.bits_choices[0], config.bits_choices[-1]
        avg = (config.target_bits * (share[1] + pinned_params) - pinned_bits) / share[1]
        share[2] = round(share[2] + (min(max(avg, lo), hi) - lo) / (hi - lo) * (auto_top - share[2]))
    other = sum(p.numel() for p in skeleton.parameters()) - quantized_params
    head = config.head_scheme
    if head is not None:
        name, lin = adapter.lm_head()
        emb = skeleton.get_input_embeddings()
        tied = emb is not None and getattr(emb, "weight", None) is lin.weight
        _add(shares[f"lm_head {head.describe()}"], name, lin.out_features, lin.in_features,
             packed_nbytes(lin.out_features, lin.in_features, head, itemsize))
        if not tied:  # a tied head is untied: its 16-bit embedding stays in `other`
            other -= lin.weight.numel()
    rows = [SchemeShare(s, n, params, nbytes, first) for s, (n, params, nbytes, first) in shares.items()]
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    needs = build_solver(config.method, config.solver).needs
    streams = 0 if not needs.hessian else 2 if needs.fp_inputs else 1
    hidden = skeleton.get_input_embeddings().weight.shape[1]
    calib = config.calib
    per_layer_in, shared_kv = _layer_side_inputs(skeleton.config.get_text_config(), layers)
    tokens = calib.num_samples * calib.max_seq_len
    desc = (f"{calib.num_samples} samples x {calib.max_seq_len} tokens x "
            + (f"({hidden} + shared keys and values {shared_kv})" if shared_kv else f"{hidden}")
            + f" x {itemsize} B x {streams} stream{'s' if streams > 1 else ''}"
            + (f", + per-layer inputs ({len(layers)} layers x {per_layer_in} per token) once" if per_layer_in else ""))
    carried = tuple(getattr(skeleton, UNBUILT, ()))
    return QuantizationPlan(
        str(model), skeleton.config.model_type, dtype, len(layers), rows, kept, other,
        total_params=sum(p.numel() for p in skeleton.parameters()), layer_params=sum(per_layer),
        largest_layer_params=max(per_layer, default=0),
        calib_bytes=(streams * tokens * (hidden + shared_kv) + bool(streams) * tokens * len(layers) * per_layer_in)
        * itemsize,
        calib_desc=desc,
        carried=carried, carried_bytes=CarriedTensors(TensorStore(model_dir, "model"), carried).nbytes() if carried
        else 0, weights_seen=any(Path(model_dir).glob("*.safetensors")),
    )


def _layer_side_inputs(text_config, layers) -> tuple[int, int]:
    """What a model hands its decoder layers besides the hidden states, per token, that the pipeline holds with
    them: Gemma 4's per-layer inputs (``hidden_size_per_layer_input`` for each layer, recorded once with the layers'
    arguments) and the keys and values its last layers reuse (kept per stream: ``k_proj``'s width twice for each
    layer that stores them)."""
    per_layer_in = getattr(text_config, "hidden_size_per_layer_input", 0) or 0
    shared_kv = sum(2 * layer.self_attn.k_proj.out_features for layer in layers
                    if getattr(getattr(layer, "self_attn", None), "store_full_length_kv", False))
    return per_layer_in, shared_kv


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _add(share: list, name: str, n: int, k: int, nbytes: int) -> None:
    share[0] += 1
    share[1] += n * k
    share[2] += nbytes
    share[3] = share[3] or name
