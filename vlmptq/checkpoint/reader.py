"""Read compressed-tensors ``pack-quantized`` checkpoints: validate, dequantize, inspect.

Reads what :mod:`vlmptq.checkpoint.writer` writes (one scheme for the decoder linears, optionally
others for named modules such as ``lm_head``) and other int weight-only pack-quantized checkpoints,
including 3-bit ones in compressed-tensors <= 0.17's padded layout (told apart from the dense layout
by the packed width; see :mod:`vlmptq.checkpoint.packing`).
Tensor names are the on-disk ones (``model.layers.0.self_attn.q_proj.weight_packed``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmptq.checkpoint.compress import (
    PACKED,
    SCALE,
    SHAPE,
    SUFFIXES,
    ZERO,
    LayerLayout,
    check_layer_tensors,
    decompress_weight,
)
from vlmptq.checkpoint.config import ParsedQuantConfig, describe_schemes, parse_quantization_config
from vlmptq.errors import CheckpointError
from vlmptq.quant.qweight import QuantizedWeight

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, with errors that say what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; pass a checkpoint folder.")
    cfg = root / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{root} has no config.json; this is not a Hugging Face checkpoint folder.")
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}); the file is damaged.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg} must hold a JSON object.")
    return data


def read_quantization_config(path: str | Path) -> ParsedQuantConfig:
    """The validated ``quantization_config`` of a checkpoint directory."""
    cfg = read_config(path)
    if "quantization_config" not in cfg:
        raise CheckpointError(
            f"{Path(path) / 'config.json'} has no quantization_config: this is not a quantized checkpoint "
            f"(quantize it with `vlmptq quantize` first)."
        )
    return parse_quantization_config(cfg["quantization_config"], source=str(Path(path) / "config.json"))


def open_safetensors(path: Path, what: str = "checkpoint"):
    """``safe_open(path)``; a truncated or corrupt file (its header does not parse, or its tensors run past
    the end: an interrupted copy or download) is a :class:`CheckpointError` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): the {what} is incomplete or corrupt "
                              "(an interrupted copy or download?); copy or download it again") from None


class TensorStore:
    """Lazy access to a checkpoint's safetensors tensors by name (single file or sharded). ``what`` names the
    folder in errors (``checkpoint``, ``model``)."""

    def __init__(self, root: str | Path, what: str = "checkpoint"):
        self.root = Path(root)
        index = self.root / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}).") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.root} holds no *.safetensors weights.")
        self._files = {}
        self._where: dict[str, str] = {}
        for fname in files:
            fpath = self.root / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath} is listed in {INDEX_NAME} but missing.")
            handle = open_safetensors(fpath, what)
            self._files[fname] = handle
            for k in handle.keys():
                self._where[k] = fname

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._files[self._where[name]].get_slice(name)
        dtype = sl.get_dtype()
        if dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} has unsupported safetensors dtype {dtype}.")
        return tuple(sl.get_shape()), _DTYPES[dtype]

    def nbytes(self, name: str) -> int:
        shape, dtype = self.meta(name)
        n = 1
        for d in shape:
            n *= d
        return n * torch.empty((), dtype=dtype).element_size()


def _quantized_modules(store: TensorStore) -> dict[str, dict[str, str]]:
    """module -> {local suffix: full tensor name} for every module holding any pack-quantized tensor."""
    out: dict[str, dict[str, str]] = {}
    for key in store.keys():
        module, _, local = key.rpartition(".")
        if local in SUFFIXES or local == "weight_g_idx":
            out.setdefault(module, {})[local] = key
    return out


def _check_module_tensors(
    module: str, names: dict[str, str], store: TensorStore, pq: ParsedQuantConfig
) -> LayerLayout:
    if f"{module}.weight" in store:
        raise CheckpointError(
            f"module {module!r} has both a dense 'weight' and packed tensors; the checkpoint is inconsistent."
        )
    shapes = {local: store.meta(full) for local, full in names.items()}
    shape_t = store.get(names[SHAPE]) if SHAPE in names else None
    return check_layer_tensors(module, shapes, shape_t, pq.scheme_for(module))


@dataclass
class QuantizedCheckpoint:
    """A validated pack-quantized checkpoint directory (tensors read lazily)."""

    path: Path
    config: ParsedQuantConfig
    store: TensorStore
    layers: dict[str, LayerLayout]  # on-disk module name -> layout

    def describe(self) -> str:
        """``W3 g128 asym`` (+ the modules with other schemes, counted as modules): ``describe_schemes``."""
        return describe_schemes(self.config.scheme, self.config.named_schemes(list(self.layers)))

    def quantized_weight(self, module: str) -> QuantizedWeight:
        names = {s: f"{module}.{s}" for s in SUFFIXES if f"{module}.{s}" in self.store}
        scheme = self.config.scheme_for(module)
        return decompress_weight(module, {s: self.store.get(n) for s, n in names.items()}, scheme)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor with each quantized module's packed tensors replaced by ``<module>.weight``."""
        packed = {f"{m}.{s}" for m in self.layers for s in SUFFIXES}
        for key in self.store.keys():
            if key not in packed:
                yield key, self.store.get(key)
        for module in self.layers:
            yield f"{module}.weight", self.quantized_weight(module).dequantize()


def open_checkpoint(path: str | Path) -> QuantizedCheckpoint:
    """Read and validate a checkpoint's config and every quantized layer's tensor shapes and dtypes."""
    root = Path(path)
    pq = read_quantization_config(root)
    store = TensorStore(root)
    layers = {}
    for module, names in sorted(_quantized_modules(store).items()):
        layers[module] = _check_module_tensors(module, names, store, pq)
    if not layers:
        raise CheckpointError(
            f"{root}: config.json declares {pq.describe()} but no tensor is named *.weight_packed; "
            f"the weights are not packed (wrong quantization_status or format)."
        )
    ignored_packed = sorted(set(layers) & set(pq.ignore))
    if ignored_packed:
        raise CheckpointError(
            f"{root}: module {ignored_packed[0]!r} is in quantization_config.ignore but holds packed "
            f"tensors; "
            f"stock loaders would read it as 16-bit. The checkpoint is inconsistent."
        )
    return QuantizedCheckpoint(path=root, config=pq, store=store, layers=layers)


def dequantize_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (on-disk names) with quantized layers restored as ``<module>.weight``
    in their scales' dtype. Reads both 3-bit layouts. Load into a HF model with
    ``model.load_state_dict`` after mapping names, or save it as a dense checkpoint.
    """
    return dict(open_checkpoint(path).iter_tensors())


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / (self.out_features * self.in_features)


@dataclass
class CheckpointReport:
    """Summary of a quantized checkpoint, as printed by ``vlmptq inspect``."""

    path: Path
    scheme: str
    layers: list[LayerReport]
    ignore: list[str]                # on-disk names of the 16-bit linears
    bytes_by_part: dict[str, int]    # packed weights / scales / zero points / 16-bit tensors
    bits_per_weight: float           # quantized layers, all their tensors counted
    compression_ratio: float         # quantized layers vs 16-bit
    checkpoint_compression_ratio: float  # whole checkpoint vs all-16-bit
    layout: str                      # "dense" or "padded (compressed-tensors <= 0.17)"
    marker: dict[str, Any] | None = None
    ignore_aliases: list[str] = field(default_factory=list)  # other ignore entries (transformers-5 names)

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_by_part.values())

    def format(self) -> str:
        lines = [
            f"checkpoint  {self.path}",
            f"scheme      {self.scheme} (compressed-tensors pack-quantized, {self.layout} layout)",
        ]
        if self.marker:
            m = self.marker
            desc = ", ".join(f"{k}={m[k]}" for k in ("vlmptq_version", "method") if k in m)
            lines.append(f"written by  vlmptq ({desc})" if desc else "written by  vlmptq")
            for k, v in m.items():
                if k not in ("vlmptq_version", "method", "format_version", "packing"):
                    lines.append(f"  {k}: {_summary(v)}")
        else:
            lines.append("written by  (no vlmptq marker: another exporter)")
        width = max([len(r.name) for r in self.layers] + [len("quantized linear")])
        lines += ["", f"{'quantized linear':<{width}}  {'shape (N x K)':>13}  {'bits/w':>6}  {'bytes':>12}"]
        for r in self.layers:
            shape = f"{r.out_features} x {r.in_features}"
            lines.append(f"{r.name:<{width}}  {shape:>13}  {r.bits_per_weight:6.3f}  {r.bytes:12,d}")
        lines += ["", f"16-bit linears (ignore, {len(self.ignore)}): " + (", ".join(self.ignore) or "none")]
        if self.ignore_aliases:
            lines.append(f"  (+{len(self.ignore_aliases)} ignore entries naming no on-disk module, e.g. "
                         f"transformers-5 module names)")
        lines.append("")
        for part, n in self.bytes_by_part.items():
            lines.append(f"{part:<24}{n:>16,d} bytes  ({n / 2**20:,.2f} MiB)")
        lines.append(f"{'total':<24}{self.bytes_total:>16,d} bytes  ({self.bytes_total / 2**20:,.2f} MiB)")
        lines += [
            "",
            f"bits per weight (quantized linears)  {self.bits_per_weight:.3f}",
            f"compression vs 16-bit                {self.compression_ratio:.2f}x quantized linears, "
            f"{self.checkpoint_compression_ratio:.2f}x whole checkpoint",
        ]
        return "\n".join(lines)

    __str__ = format


def _summary(value, limit: int = 8) -> str:
    """A metadata value as JSON; a per-linear table (VLM-PTQ's mu: one entry per linear, 18,624 for a 30B MoE) as
    how often each value occurs."""
    if isinstance(value, dict) and len(value) > limit and all(isinstance(v, (int, float, str)) for v in value.values()):
        from collections import Counter

        counts = sorted(Counter(value.values()).items(), key=lambda kv: (-kv[1], str(kv[0])))
        shown = ", ".join(f"{json.dumps(v)} x {n}" for v, n in counts[:limit])
        return f"{len(value)} linears: {shown}{', ...' if len(counts) > limit else ''}"
    return json.dumps(value, sort_keys=True)


def inspect_checkpoint(path: str | Path) -> CheckpointReport:
    """Scheme, quantized layers, ignored modules and sizes of a checkpoint, without reading weights."""
    ckpt = open_checkpoint(path)
    store = ckpt.store
    parts = {"packed weights": 0, "scales": 0, "zero points": 0, "shapes": 0, "16-bit tensors": 0}
    part_of = {PACKED: "packed weights", SCALE: "scales", ZERO: "zero points", SHAPE: "shapes"}
    layers = []
    packed_keys = set()
    for module, lay in ckpt.layers.items():
        total = 0
        for s in SUFFIXES:
            key = f"{module}.{s}"
            if key in store:
                n = store.nbytes(key)
                parts[part_of[s]] += n
                total += n
                packed_keys.add(key)
        layers.append(LayerReport(module, lay.out_features, lay.in_features, total))
    for key in store.keys():
        if key not in packed_keys:
            parts["16-bit tensors"] += store.nbytes(key)
    numel = sum(r.out_features * r.in_features for r in layers)
    bytes_q = sum(r.bytes for r in layers)
    total = sum(parts.values())
    padded = any(lay.padded3 for lay in ckpt.layers.values())
    return CheckpointReport(
        path=ckpt.path,
        scheme=ckpt.describe(),
        layers=layers,
        ignore=[i for i in ckpt.config.ignore if f"{i}.weight" in store],
        ignore_aliases=[i for i in ckpt.config.ignore if f"{i}.weight" not in store],
        bytes_by_part=parts,
        bits_per_weight=8 * bytes_q / numel,
        compression_ratio=2 * numel / bytes_q,
        checkpoint_compression_ratio=(total - bytes_q + 2 * numel) / total,
        layout="padded (compressed-tensors <= 0.17)" if padded else "dense",
        marker=ckpt.config.marker,
    )
