"""The sequential layer-by-layer quantization loop (SPEC §2 "Pipeline").

    calibration samples (+ vision / text token masks)
      -> record every decoder layer's call arguments (one cheap pass: layers replaced by recorders)
      -> for each decoder layer, on the compute device:
           for each input-sharing group (q/k/v, o, gate/up, down), in order:
               X  = the group's input when the partly quantized layer runs on the quantized stream
               X~ = the same from a frozen full-precision copy on the full-precision stream
                    (only if the solver asks for fp inputs)
               statistics (H, dXXT, per-modality diagonals) -> solver -> fake-quant write-back
           propagate both streams through the layer (quantized / full precision)
      -> optionally the lm_head, its X / X~ the final norm of the two streams (own scheme)
      -> quantized weights per linear
Groups are processed in order, so a group's inputs already see the earlier groups of the same
layer quantized ("true sequential"). The loop never names an algorithm: it reads ``solver.needs``.
Only the current layer (and its fp copy) is on the compute device.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmptq.checkpoint.config import VLLM_FUSED_LINEARS, natural_key, summarize_names
from vlmptq.errors import ConfigError, SolverError, UnsupportedModelError
from vlmptq.models.adapters import KEPT_16BIT, ModelAdapter, kept_16bit_linears
from vlmptq.models.experts import UnfusedExperts, experts_modules, unfuse_experts
from vlmptq.pipeline.capture import (
    LayerCall, advance, capture_layer_inputs, fork_stream, input_sharing_groups, layer_args_of, layer_input_of,
    release_layer,
)
from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme
from vlmptq.solvers.base import Solver, StatsRequest
from vlmptq.solvers.modality import layer_loss
from vlmptq.stats import InputStatistics, StatisticsAccumulator

if TYPE_CHECKING:
    from vlmptq.models.lazy import LazyLayers
    from vlmptq.pipeline.progress import LayerProgress

logger = logging.getLogger(__name__)


class CalibrationSample(Protocol):
    inputs: dict[str, torch.Tensor]
    vision_mask: torch.Tensor
    text_mask: torch.Tensor
    sample_id: str


@dataclass
class LinearRecord:
    """One quantized linear: what the per-layer log prints and the benchmarks collect."""

    name: str
    shape: tuple[int, int]
    seconds: float
    rel_error: float | None = None  # tr(E H E^T) / tr(W H W^T): relative output error on calibration inputs
    rel_error_asym: float | None = None  # same with the asymmetric objective (up to its constant)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    quantized: dict[str, QuantizedWeight]  # module name -> codes/scales/zeros (on CPU)
    records: list[LinearRecord]
    frozen: list[str]  # Linear modules left in 16-bit
    seconds: float

    def code_bits(self) -> float:
        """Average code bits per quantized decoder-linear weight (without scales and zero points, nor the
        lm_head)."""
        layers = [qw for name, qw in self.quantized.items() if not name.endswith("lm_head")]
        numel = sum(qw.numel() for qw in layers)
        return round(sum(qw.scheme.bits * qw.numel() for qw in layers) / max(numel, 1), 3)


@dataclass
class _Streams:
    """Per-sample hidden states entering the current layer, and each sample's recorded calls."""

    quant: list[torch.Tensor]
    fp: list[torch.Tensor] | None
    calls: list[list[LayerCall]]  # [layer][sample], the quantized stream's
    fp_calls: list[list[LayerCall]] | None = None  # the same arguments with the fp stream's own carried state

    def call(self, li: int, si: int, fp: bool = False) -> LayerCall:
        """Layer ``li``'s recorded call for sample ``si`` on the quantized stream, or (``fp``) the fp stream."""
        return (self.fp_calls if fp and self.fp_calls is not None else self.calls)[li][si]

    def done(self, li: int, offload: torch.device) -> None:
        """Layer ``li`` has run on both streams: its arguments are no longer needed, what it left in the state
        carried to later layers moves to ``offload``."""
        for calls in [c for c in (self.calls, self.fp_calls) if c is not None]:
            release_layer(calls, li, offload)


def compile_ignore(patterns: Sequence[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"--ignore pattern {p!r} is not a valid regular expression: {e}") from e
    return out


def check_layers_fit(layers: nn.ModuleList, prefix: str, ignore: list[re.Pattern],
                      scheme_for: Callable[[str], WeightScheme]) -> None:
    """Fail before any work if a linear cannot take its scheme (e.g. K not divisible by the group), if
    --ignore keeps part of a group vLLM fuses in 16-bit, or if --override gives such a group two
    schemes (either way the checkpoint could not be served)."""
    for li, layer in enumerate(layers):
        keep, skipped = quantizable_linears(layer, f"{prefix}.{li}", ignore)
        _check_fused_siblings(f"{prefix}.{li}", keep, skipped)
        _check_experts(f"{prefix}.{li}", layer, keep, skipped, scheme_for)
        for name in keep:
            full = f"{prefix}.{li}.{name}"
            k, scheme = layer.get_submodule(name).in_features, scheme_for(full)
            if scheme.group_size != -1 and k % scheme.group_size:
                raise ConfigError(
                    f"{full} has {k} input features, not divisible by group_size={scheme.group_size}; choose a "
                    f"group size dividing {k} (or -1 per channel), or keep the layer in 16-bit with --ignore"
                )
        _check_fused_schemes(f"{prefix}.{li}", keep, scheme_for)


def check_model_fits(adapter: ModelAdapter, ignore: Sequence[str], scheme_for: Callable[[str], WeightScheme],
                     head_scheme: WeightScheme | None, overrides: Sequence[str] = ()) -> None:
    """:func:`check_layers_fit` for the decoder layers, :func:`check_head_fits` for a quantized lm_head and
    :func:`check_patterns_take_linears` for the ``ignore`` and ``overrides`` patterns: shapes and names only, so it
    runs on the meta-device skeleton before any weight is read."""
    prefix, layers = adapter.decoder_layers()
    patterns = compile_ignore(ignore)
    check_patterns_take_linears(layers, prefix, patterns, overrides)
    check_layers_fit(layers, prefix, patterns, scheme_for)
    if head_scheme is not None:
        check_head_fits(adapter, head_scheme)


def check_patterns_take_linears(layers: nn.ModuleList, prefix: str, ignore: list[re.Pattern],
                                overrides: Sequence[str]) -> None:
    """Every ``--ignore`` pattern must match a decoder linear, and every ``--override`` pattern a decoder linear that
    no earlier override took (the first match wins): a pattern with a typo would otherwise change nothing,
    silently."""
    names = [f"{prefix}.{li}.{n}" for li, layer in enumerate(layers)
             for n in quantizable_linears(layer, f"{prefix}.{li}", [])[0]]
    kept = [f"{prefix}.{li}.{n}" for li, layer in enumerate(layers) for n in kept_16bit_linears(layer)]
    like = f"decoder linears are named like {names[0]!r}" if names else "the model has no decoder linears"
    for rx in ignore:
        if not any(rx.search(n) for n in names):
            if any(rx.search(n) for n in kept):  # what it asks for holds already
                logger.info("--ignore '%s' matches only linears this model always keeps in 16-bit (%s)", rx.pattern,
                            summarize_names(sorted((n for n in kept if rx.search(n)), key=natural_key)))
                continue
            raise ConfigError(f"--ignore '{rx.pattern}' matches no decoder linear ({like}; the vision tower and "
                              "projector are always kept in 16-bit); correct the pattern or drop it")
    taken: set[str] = set()
    for pattern in overrides:
        rx = re.compile(pattern)
        hits = {n for n in names if rx.search(n)}
        if not hits and any(rx.search(n) for n in kept):
            raise ConfigError(
                f"--override '{pattern}' matches only linears this model keeps in 16-bit "
                f"({summarize_names(sorted((n for n in kept if rx.search(n)), key=natural_key))}): vLLM serves them "
                "unquantized (see the model's adapter in vlmptq/models/adapters.py); drop the pattern")
        if not hits:
            raise ConfigError(f"--override '{pattern}' matches no decoder linear ({like}); correct the pattern or "
                              "drop it")
        if hits <= taken:
            raise ConfigError(f"--override '{pattern}' changes nothing: every decoder linear it matches "
                              f"({summarize_names(sorted(hits, key=natural_key))}) is taken by an earlier --override "
                              "(the first match wins); put it before them or drop it")
        taken |= hits


def _check_fused_schemes(prefix: str, keep: list[str], scheme_for: Callable[[str], WeightScheme]) -> None:
    for siblings in VLLM_FUSED_LINEARS.values():
        for parent in sorted({n.rpartition(".")[0] for n in keep if n.rpartition(".")[2] in siblings}):
            schemes = {s: scheme_for(f"{prefix}.{parent}.{s}") for s in siblings if f"{parent}.{s}" in keep}
            if len(set(schemes.values())) > 1:
                got = ", ".join(f"{s} {sc.describe()}" for s, sc in schemes.items())
                raise ConfigError(
                    f"--override gives {prefix}.{parent}.{{{','.join(schemes)}}} different schemes ({got}): vLLM "
                    f"serves {' / '.join(siblings)} as one fused layer with one scheme. Override all of them "
                    f"alike, e.g. '{re.escape(prefix + '.' + parent)}\\.({'|'.join(siblings)})$=BITS'"
                )


def _check_experts(prefix: str, layer: nn.Module, keep: list[str], skipped: list[str],
                   scheme_for: Callable[[str], WeightScheme]) -> None:
    """vLLM serves a mixture-of-experts block's experts as one layer (FusedMoE) with one scheme: all of their
    linears are quantized alike, or all kept in 16-bit."""
    for path in experts_modules(layer):
        kept = [n for n in keep if n.startswith(path + ".")]
        left = [n for n in skipped if n.startswith(path + ".")]
        where = f"{prefix}.{path}"
        if kept and left:
            raise ConfigError(
                f"--ignore keeps {len(left)} of the {len(kept) + len(left)} expert linears of {where} in 16-bit (e.g. "
                f"{prefix}.{left[0]}): vLLM serves a block's experts as one fused layer with one scheme. Ignore all "
                f"of them or none, e.g. --ignore '{re.escape(where)}\\.'")
        schemes = {scheme_for(f"{prefix}.{n}") for n in kept}
        if len(schemes) > 1:
            got = ", ".join(sorted(sc.describe() for sc in schemes))
            raise ConfigError(
                f"--override gives the experts of {where} different schemes ({got}): vLLM serves a block's experts "
                f"as one fused layer with one scheme. Override all of them alike, e.g. '{re.escape(where)}\\.=BITS'")


def _check_fused_siblings(prefix: str, keep: list[str], skipped: list[str]) -> None:
    for siblings in VLLM_FUSED_LINEARS.values():  # vLLM serves each as one layer, one scheme
        for parent in {n.rpartition(".")[0] for n in skipped if n.rpartition(".")[2] in siblings}:
            kept = [f"{parent}.{s}" for s in siblings if f"{parent}.{s}" in keep]
            if kept:
                left = [n for n in skipped if n.rpartition(".")[0] == parent and n.rpartition(".")[2] in siblings]
                raise ConfigError(
                    f"--ignore keeps {', '.join(f'{prefix}.{n}' for n in left)} in 16-bit but not "
                    f"{', '.join(f'{prefix}.{n}' for n in kept)}: vLLM serves {' / '.join(siblings)} as one "
                    f"fused layer with one scheme, so the checkpoint could not be served. Ignore all of them "
                    f"or none, e.g. --ignore '{re.escape(parent)}\\.({'|'.join(siblings)})$'"
                )


def quantizable_linears(layer: nn.Module, prefix: str, ignore: list[re.Pattern]) -> tuple[list[str], list[str]]:
    """Split the layer's linears into (to quantize, matched by --ignore); names relative to the layer. Linears the
    model keeps in 16-bit (``ModelAdapter.kept_16bit``) are in neither: they are the adapter's ``frozen_linears``."""
    keep, skipped = [], []
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and not getattr(mod, KEPT_16BIT, False):
            (skipped if any(p.search(f"{prefix}.{name}") for p in ignore) else keep).append(name)
    return keep, skipped


def _capture_streams(model: nn.Module, layers: nn.ModuleList, final_norm: nn.Module | None,
                     samples: Sequence[CalibrationSample], device: torch.device, offload: torch.device,
                     need_fp: bool) -> _Streams:
    """Both streams start from the hidden states entering the first decoder layer (``capture_layer_inputs``)."""
    quant, calls = capture_layer_inputs(model, layers, final_norm, samples, device, offload)
    if not need_fp:
        return _Streams(quant=quant, fp=None, calls=calls)
    return _Streams(quant=quant, fp=[h.clone() for h in quant], calls=calls, fp_calls=fork_stream(calls))


def _final_norm_or_none(adapter: ModelAdapter) -> nn.Module | None:
    """The text model's final norm, where the capture pass can stop (None: it stops at the last layer)."""
    try:
        return adapter.final_norm()
    except UnsupportedModelError:
        return None


def _group_statistics(layer: nn.Module, fp_layer: nn.Module | None, first: str, streams: _Streams, li: int,
                      samples: Sequence[CalibrationSample], needs: StatsRequest, device: torch.device,
                      in_features: int) -> InputStatistics:
    acc = StatisticsAccumulator(in_features, device, fp_inputs=needs.fp_inputs, modality=needs.modality)
    lin = layer.get_submodule(first)
    lin_fp = fp_layer.get_submodule(first) if fp_layer is not None else None
    for si, s in enumerate(samples):
        x = layer_input_of(layer, lin, streams.call(li, si), streams.quant[si], device)
        x_fp = (layer_input_of(fp_layer, lin_fp, streams.call(li, si, fp=True), streams.fp[si], device)
                if lin_fp is not None else None)
        acc.add(x, x_fp, s.vision_mask if needs.modality else None, s.text_mask if needs.modality else None)
    return acc.finalize()


def _relative_errors(w: torch.Tensor, q: torch.Tensor, stats: InputStatistics | None) -> tuple[float | None, float | None]:
    if stats is None:
        return None, None
    h = stats.hessian
    ref = layer_loss(torch.zeros_like(w, dtype=torch.float32), w.float(), h).item()  # tr(W H W^T)
    if ref <= 0:
        return None, None
    sym = layer_loss(w, q, h).item() / ref
    asym = layer_loss(w, q, h, stats.dxxt).item() / ref if stats.dxxt is not None else None
    return sym, asym


def _solve_linear(lin: nn.Linear, full: str, solver: Solver, stats: InputStatistics | None, scheme: WeightScheme,
                  scale_dtype: torch.dtype) -> tuple[QuantizedWeight, LinearRecord]:
    """Quantize one linear (its weight on the compute device), write the fake-quant weight back."""
    w = lin.weight.data
    res = solver.solve(w, stats, scheme, scale_dtype)
    q = res.qweight.dequantize(w.dtype)
    sym, asym = _relative_errors(w, q, stats)
    lin.weight.data = q.to(w.device)
    try:
        qw = res.qweight.pack().to("cpu")  # packed on the compute device; held packed until the checkpoint
    except ValueError as e:  # codes outside the grid: a solver bug, never a user's
        raise SolverError(f"{full}: {e}") from None
    rec = LinearRecord(full, tuple(w.shape), res.seconds, sym, asym,
                       {k: v for k, v in res.info.items() if k != "mu_scores"})
    logger.info("%s %s (%s): %.2fs%s%s%s", full, tuple(w.shape), scheme.describe(), res.seconds,
                f", rel. error {sym:.4g}" if sym is not None else "",
                f" (asym {asym:.4g})" if asym is not None else "",
                f", mu={res.info['mu']}" if "mu" in res.info else "")
    return qw, rec


def _solve_layer(layer: nn.Module, fp_layer: nn.Module | None, lprefix: str, names: list[str],
                 streams: _Streams | None, li: int, samples: Sequence[CalibrationSample], solver: Solver,
                 scheme_for: Callable[[str], WeightScheme], scale_dtype: torch.dtype, device: torch.device
                 ) -> tuple[dict[str, QuantizedWeight], list[LinearRecord]]:
    """Quantize the layer's linears ``names``, one input-sharing group after another; a mixture-of-experts
    block's experts (all quantized or none, :func:`check_layers_fit`) where the layer calls them."""
    experts = {path: m for path, m in experts_modules(layer).items() if any(n.startswith(path + ".") for n in names)}
    if streams is not None and names:
        plain = [n for n in names if not any(n.startswith(p + ".") for p in experts)]
        groups = input_sharing_groups(layer, LayerCall(streams.quant[0], streams.calls[li][0].kwargs), device, plain,
                                      units=list(experts))
    else:
        groups = [[n] for n in names]
    quantized: dict[str, QuantizedWeight] = {}
    records: list[LinearRecord] = []
    for group in groups:
        if group[0] in experts:
            got, recs = _solve_experts(layer, fp_layer, group[0], lprefix, streams, li, samples, solver, scheme_for,
                                       scale_dtype, device)
            quantized.update(got)
            records += recs
            continue
        in_features = layer.get_submodule(group[0]).in_features
        stats = (_group_statistics(layer, fp_layer, group[0], streams, li, samples, solver.needs, device,
                                   in_features)
                 if streams is not None else None)
        for name in group:
            full = f"{lprefix}.{name}"
            quantized[full], rec = _solve_linear(layer.get_submodule(name), full, solver, stats, scheme_for(full),
                                                 scale_dtype)
            records.append(rec)
        del stats
    return quantized, records


@dataclass
class _RoutedInputs:
    """What one sample sends into a mixture-of-experts block's experts (on the offload device)."""

    x: torch.Tensor  # [T, H] the experts' input on the quantized stream
    top_k: torch.Tensor  # [T, k] int64, the quantized stream's routing
    x_fp: torch.Tensor | None  # [T, H] the full-precision stream's input at the same tokens
    vision_mask: torch.Tensor  # [T] bool
    text_mask: torch.Tensor  # [T] bool


def _solve_experts(layer: nn.Module, fp_layer: nn.Module | None, path: str, lprefix: str, streams: _Streams, li: int,
                   samples: Sequence[CalibrationSample], solver: Solver, scheme_for: Callable[[str], WeightScheme],
                   scale_dtype: torch.dtype, device: torch.device
                   ) -> tuple[dict[str, QuantizedWeight], list[LinearRecord]]:
    """Quantize every expert of the :class:`UnfusedExperts` at ``path``, each on the tokens routed to it.

    One partial layer forward per sample and stream gives the experts' input and the routing (the
    quantized stream's: the tokens expert e serves in the quantized model); expert e's gate/up statistics
    are those tokens' rows, paired by position with the full-precision stream's rows (X~ for GPTAQ and
    VLM-PTQ), and its down projection's inputs are computed from them (``ExpertMLP.hidden``: quantized
    gate/up on X, full-precision on X~), so no further layer forward is needed per expert. An expert no
    calibration token reaches takes its statistics from every token instead (logged): all-zero statistics
    would zero its weights, and vLLM may route to it."""
    experts: UnfusedExperts = layer.get_submodule(path)
    fp_experts = fp_layer.get_submodule(path) if fp_layer is not None else None
    needs = solver.needs
    offload = streams.quant[0].device
    inputs: list[_RoutedInputs] = []
    for si, s in enumerate(samples):
        args = layer_args_of(layer, experts, streams.call(li, si), streams.quant[si], device)
        if len(args) != 3:
            raise UnsupportedModelError(f"{lprefix}.{path}: the model calls its experts with {len(args)} positional "
                                        "arguments, not (hidden_states, top_k_index, top_k_weights)")
        x, top_k, _ = args
        if needs.modality and x.shape[0] != s.vision_mask.numel():
            raise UnsupportedModelError(
                f"{lprefix}.{path}: the experts receive {x.shape[0]} of sample {s.sample_id}'s {s.vision_mask.numel()} "
                "tokens (the model sends only some tokens to this block, e.g. experts for one modality), so their "
                "rows cannot be told vision or text for --method vlmptq's per-modality statistics; quantize this "
                "model with --method gptaq or gptq")
        x_fp = (layer_args_of(fp_layer, fp_experts, streams.call(li, si, fp=True), streams.fp[si], device)[0]
                if fp_experts is not None else None)
        inputs.append(_RoutedInputs(x.to(offload), top_k.to(offload), None if x_fp is None else x_fp.to(offload),
                                    s.vision_mask.reshape(-1).to(offload), s.text_mask.reshape(-1).to(offload)))
    quantized: dict[str, QuantizedWeight] = {}
    records: list[LinearRecord] = []
    unrouted = []
    for e in tqdm(range(len(experts)), desc=f"{lprefix}.{path}", leave=False):
        rows = [(r.top_k == e).any(dim=-1).nonzero().squeeze(1) for r in inputs]
        tokens = sum(int(r.numel()) for r in rows)
        if tokens == 0:
            unrouted.append(e)
            rows = [torch.arange(r.x.shape[0], device=offload) for r in inputs]
        expert, fp_expert = experts[e], fp_experts[e] if fp_experts is not None else None
        for projections in (("gate_proj", "up_proj"), ("down_proj",)):  # gate/up solved before down reads them
            acc = StatisticsAccumulator(expert.get_submodule(projections[0]).in_features, device,
                                        fp_inputs=needs.fp_inputs, modality=needs.modality)
            for r, idx in zip(inputs, rows):
                if not idx.numel():
                    continue
                x = r.x[idx].to(device)
                x_fp = r.x_fp[idx].to(device) if r.x_fp is not None else None
                if projections == ("down_proj",):  # it reads the expert's hidden activations
                    x = expert.hidden(x)
                    x_fp = fp_expert.hidden(x_fp) if x_fp is not None else None
                acc.add(x, x_fp, r.vision_mask[idx] if needs.modality else None,
                        r.text_mask[idx] if needs.modality else None)
            stats = acc.finalize()
            for proj in projections:
                full = f"{lprefix}.{path}.{e}.{proj}"
                quantized[full], rec = _solve_linear(expert.get_submodule(proj), full, solver, stats, scheme_for(full),
                                                     scale_dtype)
                rec.info["routed_tokens"] = tokens
                records.append(rec)
            del stats
    if unrouted:
        logger.warning("%s.%s: no calibration token was routed to expert(s) %s; they were quantized with statistics "
                       "from every token entering the block (more calibration samples reach more experts)",
                       lprefix, path, unrouted)
    return quantized, records


def _restore_layer(layer: nn.Module, lprefix: str, names: list[str],
                   stored: tuple[dict[str, QuantizedWeight], list[LinearRecord]]
                   ) -> tuple[dict[str, QuantizedWeight], list[LinearRecord]]:
    """Write a stored layer's fake-quant weights back (a resumed run), after checking it holds exactly
    the linears this run quantizes, with their shapes."""
    weights, records = stored
    expected = {f"{lprefix}.{n}" for n in names}
    if set(weights) != expected:
        raise ConfigError(f"the stored progress of {lprefix} holds {sorted(weights)}, this run quantizes "
                          f"{sorted(expected)}; delete the progress directory to start over")
    for n in names:
        lin, qw = layer.get_submodule(n), weights[f"{lprefix}.{n}"]
        if tuple(lin.weight.shape) != qw.shape:
            raise ConfigError(f"the stored progress of {lprefix}.{n} is {qw.shape}, the layer "
                              f"{tuple(lin.weight.shape)}; delete the progress directory to start over")
        lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
    logger.info("%s: %d linears taken from the stored progress", lprefix, len(names))
    return weights, records


def check_head_fits(adapter: ModelAdapter, scheme: WeightScheme) -> None:
    name, head = adapter.lm_head()
    adapter.final_norm()  # its input must be computable
    k = head.in_features
    if scheme.group_size != -1 and k % scheme.group_size:
        raise ConfigError(
            f"{name} has {k} input features, not divisible by the lm_head group size {scheme.group_size}; "
            f"choose one dividing {k} (or -1 per channel) with --lm-head-group-size"
        )


def _quantize_head(adapter: ModelAdapter, solver: Solver, scheme: WeightScheme, samples: Sequence[CalibrationSample],
                   streams: _Streams | None, device: torch.device, scale_dtype: torch.dtype
                   ) -> tuple[str, QuantizedWeight, LinearRecord]:
    """The lm_head as one more input-sharing group: its inputs are the final norm's outputs on the
    quantized stream (X) and the full-precision stream (X~), after every decoder layer."""
    name, head = adapter.lm_head()
    needs = solver.needs
    stats = None
    with torch.no_grad():
        if streams is not None:  # the method needs statistics
            norm = adapter.final_norm().to(device)
            acc = StatisticsAccumulator(head.in_features, device, fp_inputs=needs.fp_inputs, modality=needs.modality)
            for si, s in enumerate(tqdm(samples, desc="lm_head statistics", leave=False)):
                x = norm(streams.quant[si].to(device))
                x_fp = norm(streams.fp[si].to(device)) if streams.fp is not None else None
                acc.add(x, x_fp, s.vision_mask if needs.modality else None, s.text_mask if needs.modality else None)
            stats = acc.finalize()
            norm.to("cpu")
        head.to(device)
        qw, rec = _solve_linear(head, name, solver, stats, scheme, scale_dtype)
        head.to("cpu")
    return name, qw, rec


def quantize_model(
    model: nn.Module,
    adapter: ModelAdapter,
    solver: Solver,
    scheme: WeightScheme,
    samples: Sequence[CalibrationSample],
    *,
    device: torch.device | str = "cpu",
    offload_device: torch.device | str = "cpu",
    ignore: Sequence[str] = (),
    head_scheme: WeightScheme | None = None,
    progress: LayerProgress | None = None,
    scheme_for: Callable[[str], WeightScheme] | None = None,
    lazy_layers: LazyLayers | None = None,
    release_quantized: bool = False,
) -> PipelineResult:
    """Quantize every decoder-layer linear of ``model`` in place (fake-quant weights) and return the
    quantized weights. ``ignore``: regexes of full module names to leave in 16-bit. ``head_scheme``:
    also quantize the lm_head (untied from the input embeddings first), after the last layer.
    ``progress``: where finished layers are stored, and taken from instead of solved again (resume).
    ``scheme_for``: a decoder linear's full name -> its scheme, where some differ from ``scheme``
    (mixed precision); default: ``scheme`` for all. ``lazy_layers``: the decoder layers are still in the
    checkpoint files and are read as they come (``vlmptq.models.lazy``); with ``release_quantized``
    their quantized linears' weights go back there (the meta device) once the layer is done, leaving
    only the returned codes (a checkpoint is written from those; the fake-quant model is gone)."""
    t_start = time.perf_counter()
    device, offload = torch.device(device), torch.device(offload_device)
    prefix, layers = adapter.decoder_layers()
    unfuse_experts(layers)  # a model not loaded by its adapter: no fused experts may stay behind unquantized
    patterns = compile_ignore(ignore)
    needs = solver.needs
    scale_dtype = next(model.parameters()).dtype
    if needs.hessian and not samples:
        raise ConfigError(f"method {solver.name!r} needs calibration samples, got none")
    label = scheme.describe() if scheme_for is None else "mixed precision"
    scheme_for = scheme_for or (lambda name: scheme)
    check_model_fits(adapter, ignore, scheme_for, head_scheme)
    if head_scheme is not None:
        adapter.untie_lm_head()
    if progress is not None:
        from vlmptq.pipeline.progress import samples_digest

        progress.bind(calibration=samples_digest(samples), decoder_layers=len(layers))

    streams = (_capture_streams(model, layers, _final_norm_or_none(adapter), samples, device, offload, needs.fp_inputs)
               if needs.hessian else None)
    quantized: dict[str, QuantizedWeight] = {}
    records: list[LinearRecord] = []
    frozen = list(adapter.frozen_linears())

    for li in tqdm(range(len(layers)), desc=f"quantizing ({solver.name}, {label})"):
        if lazy_layers is not None:
            lazy_layers.load(li, layers[li])
        layer = layers[li].to(device)
        lprefix = f"{prefix}.{li}"
        names, skipped = quantizable_linears(layer, lprefix, patterns)
        frozen += [f"{lprefix}.{n}" for n in skipped]
        for n in skipped:
            logger.info("leaving %s in 16-bit (matches --ignore)", n)
        fp_layer = copy.deepcopy(layer) if needs.fp_inputs else None
        stored = progress.load(li) if progress is not None else None
        with torch.no_grad():
            if stored is not None:
                layer_quantized, layer_records = _restore_layer(layer, lprefix, names, stored)
            else:
                layer_quantized, layer_records = _solve_layer(layer, fp_layer, lprefix, names, streams, li, samples,
                                                              solver, scheme_for, scale_dtype, device)
            quantized.update(layer_quantized)
            records += layer_records
            if streams is not None:
                for si in range(len(samples)):
                    streams.quant[si] = advance(layer, streams.call(li, si), streams.quant[si], device).to(offload)
                    if fp_layer is not None:
                        streams.fp[si] = advance(fp_layer, streams.call(li, si, fp=True), streams.fp[si],
                                                 device).to(offload)
                streams.done(li, offload)
        del fp_layer
        layers[li] = layer.to("cpu")
        if lazy_layers is not None and release_quantized:
            lazy_layers.release(layer, names)
        if progress is not None and stored is None:
            progress.save(li, layer_quantized, layer_records)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if head_scheme is not None:
        name, quantized[name], rec = _quantize_head(adapter, solver, head_scheme, samples, streams, device, scale_dtype)
        records.append(rec)
        frozen.remove(name)
    return PipelineResult(quantized, records, frozen, time.perf_counter() - t_start)
