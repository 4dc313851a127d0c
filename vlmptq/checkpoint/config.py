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
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.quant.scheme import WeightScheme

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


def build_quantization_config(
    scheme: WeightScheme,
    ignore: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` dict for a checkpoint quantized with ``scheme``.

    ``ignore`` names the Linear layers stored in 16 bit (on-disk names, plus transformers-5 module
    names where they differ: vLLM matches the former, transformers' own loader the latter);
    ``metadata`` goes into the ``vlmptq`` marker block (method, solver options, calibration summary, ...).
    """
    metadata = _jsonable(dict(metadata or {}), "metadata")
    reserved = {"format_version", "vlmptq_version", "packing"} & metadata.keys()
    if reserved:
        raise ConfigError(f"metadata keys {sorted(reserved)} are reserved by vlmptq; rename them.")
    weights = scheme.to_quantization_args().model_dump(mode="json")
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": STATUS,
        "config_groups": {
            GROUP: {
                "targets": list(TARGETS),
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": sorted(set(ignore), key=_natural_key),
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


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]


@dataclass(frozen=True)
class ParsedQuantConfig:
    """A validated ``quantization_config`` we can read."""

    scheme: WeightScheme
    ignore: tuple[str, ...]
    targets: tuple[str, ...]
    marker: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def parse_quantization_config(qc: Any, source: str = "config.json") -> ParsedQuantConfig:
    """Validate a ``quantization_config`` dict and extract the weight scheme.

    Accepts what :func:`build_quantization_config` writes and other single-scheme, weight-only
    ``pack-quantized`` int checkpoints (llm-compressor W4A16 and the like).
    """
    from compressed_tensors.quantization import QuantizationArgs

    if not isinstance(qc, Mapping):
        raise CheckpointError(f"{source}: quantization_config must be an object, got {type(qc).__name__}.")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{source}: quant_method is {method!r}; vlmptq reads only {QUANT_METHOD!r} checkpoints "
            f"(re-export the model with vlmptq)."
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise CheckpointError(
            f"{source}: quantization_config has no config_groups; expected one weight group."
        )
    if len(groups) != 1:
        raise CheckpointError(
            f"{source}: {len(groups)} config_groups ({', '.join(groups)}); vlmptq reads one weight scheme "
            f"per checkpoint."
        )
    (gname, group), = groups.items()
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
    if qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{source}: kv_cache_scheme is set; KV-cache quantization is not supported.")
    status = qc.get("quantization_status", STATUS)
    if status != STATUS:
        raise CheckpointError(
            f"{source}: quantization_status is {status!r}; expected {STATUS!r} (packed weights on disk)."
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
    marker = qc.get(MARKER)
    return ParsedQuantConfig(
        scheme=scheme,
        ignore=tuple(qc.get("ignore") or ()),
        targets=targets,
        marker=dict(marker) if isinstance(marker, Mapping) else None,
        raw=json.loads(json.dumps(qc)),
    )
