"""The ``quantization_config`` block of ``config.json`` (compressed-tensors ``pack-quantized``).

What we write (and what compressed-tensors' ``QuantizationConfig`` and vLLM's
``CompressedTensorsConfig.from_config`` read)::

    {"quant_method": "compressed-tensors", "format": "pack-quantized",
     "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"], "weights": {QuantizationArgs},
                                   "input_activations": null, "output_activations": null,
                                   "format": "pack-quantized"}},
     "ignore": [every Linear left in 16 bit, by on-disk name and, where it differs,
                by transformers-5 module name],
     "kv_cache_scheme": null, "sparsity_config": {}, "transform_config": {},
     "vlmptq": {"format_version": 1, "vlmptq_version": ..., "packing": "dense", ...metadata}}

The ``vlmptq`` block is our marker: stock loaders ignore unknown keys (compressed-tensors' pydantic
model has ``extra="ignore"``, vLLM reads keys by name), our vLLM plugin may claim checkpoints that
carry it. No compressed-tensors ``version`` key: the installed one (0.17 in the CPU venv) is not
the one whose 3-bit layout we write. Explicit ``config_groups`` (not a preset name) because there
are no 2/3-bit presets.

Layers quantized with another scheme than the decoder linears (e.g. an 8-bit ``lm_head``) get a
group of their own whose targets name them by a regex anchored at a dot boundary, so the one
target matches the on-disk name (``lm_head``), transformers' module name and vLLM's renamed module
(``language_model.lm_head``), which its compressed-tensors helpers match with ``re.match``; every
loader prefers a name match over the class target ``Linear``. Readers resolve a module's scheme with
:meth:`ParsedQuantConfig.scheme_for` by the same precedence.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.quant.scheme import WeightScheme

# Linears vLLM loads into one fused layer (name: the checkpoint's sibling linears), which takes one
# scheme: the writer's ignore list must hold all of a group's siblings or none (the quantizer refuses
# an --ignore that splits one), and the plugin falls back to these names where a vLLM model class
# declares no ``packed_modules_mapping``.
VLLM_FUSED_LINEARS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                                  "gate_up_proj": ("gate_proj", "up_proj"),
                                                  # Qwen3.5's Gated DeltaNet input projections
                                                  "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
                                                  "in_proj_ba": ("in_proj_b", "in_proj_a")}

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
STATUS = "compressed"
MARKER = "vlmptq"
MARKER_FORMAT_VERSION = 1
GROUP = "group_0"
TARGETS = ("Linear",)


def _vlmptq_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlmptq")
    except PackageNotFoundError:  # running from a source tree without an install
        return "unknown"


def _jsonable(value: Any, where: str) -> Any:
    """A JSON-safe copy of caller metadata: tensor/numpy scalars become numbers, tuples lists, paths
    strings, non-finite floats strings (strict JSON has no NaN). Anything else is refused by name."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has a non-string key {k!r}; metadata keys must be strings.")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # torch / numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        logger.warning("%s = %r is stored as a string (JSON has no NaN/inf)", where, value)
        return repr(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(
        f"{where} is a {type(value).__name__}, which config.json cannot store; convert it to a "
        f"number, string, list or dict first."
    )


def _group(scheme: WeightScheme, targets: Sequence[str]) -> dict[str, Any]:
    return {
        "targets": list(targets),
        "weights": scheme.to_quantization_args().model_dump(mode="json"),
        "input_activations": None,
        "output_activations": None,
        "format": FORMAT,
    }


def build_quantization_config(
    scheme: WeightScheme,
    ignore: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    named: Mapping[str, WeightScheme] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` dict for a checkpoint whose linears are quantized with ``scheme``.

    ``ignore`` names the Linear layers stored in 16 bit (on-disk names, plus transformers-5 module
    names where they differ: vLLM matches the former, transformers' own loader the latter);
    ``named`` maps modules quantized with another scheme (e.g. ``lm_head``) to it: one config group
    per scheme, targeting them by name (:func:`name_target`); ``metadata`` goes into the ``vlmptq``
    marker block (method, solver options, calibration summary, ...).
    """
    metadata = _jsonable(dict(metadata or {}), "metadata")
    reserved = {"format_version", "vlmptq_version", "packing"} & metadata.keys()
    if reserved:
        raise ConfigError(f"metadata keys {sorted(reserved)} are reserved by vlmptq; rename them.")
    groups = {GROUP: _group(scheme, TARGETS)}
    by_scheme: dict[WeightScheme, list[str]] = {}
    for module, s in (named or {}).items():
        if module in ignore:
            raise ConfigError(f"module {module!r} is both in ignore and quantized with {s.describe()}.")
        by_scheme.setdefault(s, []).append(module)
    named_groups = sorted((sorted(modules, key=natural_key), s) for s, modules in by_scheme.items())
    for i, (modules, s) in enumerate(named_groups, start=1):  # numbered by their first module's name
        groups[f"group_{i}"] = _group(s, [name_target(m) for m in modules])
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": STATUS,
        "config_groups": groups,
        "ignore": sorted(set(ignore), key=natural_key),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        MARKER: {
            "format_version": MARKER_FORMAT_VERSION,
            "vlmptq_version": _vlmptq_version(),
            "packing": "dense",
            **metadata,
        },
    }


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]


@dataclass(frozen=True)
class SchemeGroup:
    """One config group: the modules its targets select, quantized with one scheme."""

    name: str
    targets: tuple[str, ...]
    scheme: WeightScheme

    def matches_by_name(self, module: str) -> bool:
        """A name or ``re:`` target selects ``module`` (class-name targets do not: see :func:`is_class_target`)."""
        return any(_name_match(t, module) for t in self.targets if not is_class_target(t))

    @property
    def by_class(self) -> bool:
        return any(is_class_target(t) for t in self.targets)


def is_class_target(target: str) -> bool:
    """Module class names (``Linear``) as compressed-tensors writes them; names and regexes are not."""
    return not target.startswith("re:") and "." not in target and target[:1].isupper()


def _name_match(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target


@dataclass(frozen=True)
class ParsedQuantConfig:
    """A validated ``quantization_config`` we can read.

    ``scheme`` is the decoder linears' scheme (the group targeting a class such as ``Linear``, or
    the only group); modules named by other groups may use others: ask :meth:`scheme_for`.
    """

    scheme: WeightScheme
    ignore: tuple[str, ...]
    targets: tuple[str, ...]
    marker: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    groups: tuple[SchemeGroup, ...] = ()

    def scheme_for(self, module: str, source: str = "config.json") -> WeightScheme:
        """The scheme a packed module was stored with: a group naming it, else the class-target
        group (compressed-tensors' and vLLM's precedence); a single group covers every module."""
        if len(self.groups) <= 1:
            return self.scheme
        for g in self.groups:
            if g.matches_by_name(module):
                return g.scheme
        for g in self.groups:
            if g.by_class:
                return g.scheme
        raise CheckpointError(
            f"{source}: module {module!r} holds packed tensors but no config group targets it "
            f"(targets: {[t for g in self.groups for t in g.targets]})."
        )

    def named_schemes(self, modules: Sequence[str]) -> dict[str, WeightScheme]:
        """The ``modules`` a group other than the primary one names, with that group's scheme."""
        out = {}
        for m in modules:
            for g in self.groups:
                if (g.targets, g.scheme) != (self.targets, self.scheme) and g.matches_by_name(m):
                    out[m] = g.scheme
                    break
        return out

    def describe(self) -> str:
        """``W3 g128 asym`` or, with named groups, ``W3 g128 asym; lm_head W8 g128 asym`` (a long group
        is shortened: ``model.layers.0.mlp.down_proj and 55 more W4 g128 asym``)."""
        parts = [self.scheme.describe()]
        for g in self.groups:
            if (g.targets, g.scheme) != (self.targets, self.scheme):  # the primary group is listed first
                parts.append(f"{summarize_names([_target_label(t) for t in g.targets])} {g.scheme.describe()}")
        return "; ".join(parts)


def describe_schemes(scheme: WeightScheme, named: Mapping[str, WeightScheme]) -> str:
    """``W2 g128 asym; lm_head W8 g128 asym; model.layers.0.mlp.down_proj and 27 more W4 g128 asym``: the
    primary scheme, then the modules ``named`` by a group of their own (an lm_head even at the primary
    scheme), counted as modules, not as the config's targets (which name each module twice where
    vLLM's and transformers' names differ)."""
    by_scheme: dict[WeightScheme, list[str]] = {}
    for name, s in named.items():
        by_scheme.setdefault(s, []).append(name)
    parts = sorted(f"{summarize_names(sorted(names, key=natural_key))} {s.describe()}"
                   for s, names in by_scheme.items())
    return "; ".join([scheme.describe(), *parts])


def summarize_names(names: Sequence[str], limit: int = 3) -> str:
    """``a, b, c`` or, past ``limit`` names, ``a and 27 more``."""
    names = list(names)
    return ", ".join(names) if len(names) <= limit else f"{names[0]} and {len(names) - 1} more"


_NAME_PREFIX = "re:^(.*\\.)?"  # what name_target puts before the escaped module name


def name_target(module: str) -> str:
    """The config-group target naming one module: a regex matching ``module`` and any renamed
    prefix of it (``lm_head`` -> ``re:^(.*\\.)?lm_head$`` also matches ``language_model.lm_head``)."""
    return f"{_NAME_PREFIX}{re.escape(module)}$"


def named_module(target: str) -> str | None:
    """The module name a :func:`name_target` regex names, else None."""
    if target.startswith(_NAME_PREFIX) and target.endswith("$"):
        return re.sub(r"\\(.)", r"\1", target[len(_NAME_PREFIX):-1])
    return None


def _target_label(target: str) -> str:
    """The module name a :func:`name_target` regex names; other targets as they are."""
    return named_module(target) or target


def _parse_group(gname: str, group: Any, qc: Mapping[str, Any], source: str) -> SchemeGroup:
    from compressed_tensors.quantization import QuantizationArgs

    if not isinstance(group, Mapping):
        raise CheckpointError(
            f"{source}: config_groups.{gname} is a preset reference ({group!r}); expected an explicit "
            f"scheme with targets and weights."
        )
    fmt = group.get("format") or qc.get("format")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{source}: format is {fmt!r}; vlmptq reads {FORMAT!r} (int weights packed into int32)."
        )
    for act in ("input_activations", "output_activations"):
        if group.get(act):
            raise CheckpointError(
                f"{source}: config_groups.{gname}.{act} is set; only weight-only quantization "
                f"(A16) is supported."
            )
    try:
        args = QuantizationArgs.model_validate(group.get("weights"))
        if args.actorder not in (None, "static", "weight"):
            raise ConfigError(f"activation ordering {args.actorder!r} (g_idx) is not supported")
        if args.dynamic:
            raise ConfigError("dynamic weight quantization is not supported")
        scheme = WeightScheme.from_quantization_args(args)
    except (ValueError, ConfigError) as e:  # pydantic.ValidationError is a ValueError
        raise CheckpointError(
            f"{source}: config_groups.{gname}.weights is not a supported scheme: {e}"
        ) from e
    targets = tuple(group.get("targets") or ())
    if not targets:
        raise CheckpointError(f"{source}: config_groups.{gname}.targets is empty; expected e.g. ['Linear'].")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise CheckpointError(f"{source}: config_groups.{gname} target {t!r} is not a valid regex: {e}") from e
    return SchemeGroup(gname, targets, scheme)


def parse_quantization_config(qc: Any, source: str = "config.json") -> ParsedQuantConfig:
    """Validate a ``quantization_config`` dict and extract the weight scheme(s).

    Accepts what :func:`build_quantization_config` writes and other weight-only ``pack-quantized``
    int checkpoints (llm-compressor W4A16 and the like): one group, or several where at most one
    targets a module class and the others name modules.
    """
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"{source}: quantization_config must be an object, got {type(qc).__name__}.")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{source}: quant_method is {method!r}; vlmptq reads only {QUANT_METHOD!r} checkpoints "
            f"(re-export the model with vlmptq)."
        )
    raw_groups = qc.get("config_groups")
    if not isinstance(raw_groups, Mapping) or not raw_groups:
        raise CheckpointError(
            f"{source}: quantization_config has no config_groups; expected one weight group."
        )
    if qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{source}: kv_cache_scheme is set; KV-cache quantization is not supported.")
    status = qc.get("quantization_status", STATUS)
    if status != STATUS:
        raise CheckpointError(
            f"{source}: quantization_status is {status!r}; expected {STATUS!r} (packed weights on disk)."
        )
    groups = tuple(_parse_group(n, g, qc, source) for n, g in raw_groups.items())
    by_class = [g for g in groups if g.by_class]
    if len(groups) > 1 and len(by_class) > 1:
        raise CheckpointError(
            f"{source}: config groups {', '.join(g.name for g in by_class)} all target module classes "
            f"({', '.join(t for g in by_class for t in g.targets if is_class_target(t))}); vlmptq reads one "
            f"class-wide scheme plus groups that name their modules."
        )
    primary = by_class[0] if by_class else groups[0]
    marker = qc.get(MARKER)
    return ParsedQuantConfig(
        scheme=primary.scheme,
        ignore=tuple(qc.get("ignore") or ()),
        targets=primary.targets,
        marker=dict(marker) if isinstance(marker, Mapping) else None,
        raw=json.loads(json.dumps(qc)),
        groups=groups,
    )
