"""Write a quantized model as a compressed-tensors ``pack-quantized`` checkpoint directory.

Output (names are the original checkpoint's, e.g. ``model.layers.0.self_attn.q_proj``, not the
transformers-5 module names ``model.language_model.layers.0...``):
    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
        quantized linears: weight_packed / weight_scale / [weight_zero_point] / weight_shape
        (layouts in :mod:`vlmptq.checkpoint.compress`); every other tensor as the model holds it; tensors of
        the source files the model does not hold (multi-token-prediction layers) as the files hold them
        (:mod:`vlmptq.checkpoint.carried`)
    config.json             the model config + ``quantization_config`` (:mod:`.config`)
    generation_config.json  and the tokenizer / processor / chat-template files of ``source_dir``

The write is atomic: everything goes to a hidden sibling directory that is renamed into place only
when complete, so an error or Ctrl-C leaves ``out_dir`` as it was (absent, or its old content).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmptq.checkpoint.carried import CarriedTensors
from vlmptq.checkpoint.compress import compress_weight
from vlmptq.checkpoint.config import build_quantization_config, describe_schemes
from vlmptq.checkpoint.naming import check_no_converter, disk_names, module_disk_names
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.quant.qweight import QuantizedWeight
from vlmptq.quant.scheme import WeightScheme

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files never copied from source_dir: weights and their indexes (ours replace them), and the two
# configs we write from the in-memory model.
_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx",
)
_WRITTEN = ("config.json",)


@dataclass(frozen=True)
class CheckpointSummary:
    """What :func:`save_quantized_checkpoint` wrote. Sizes are tensor bytes (no file headers)."""

    path: Path
    scheme: str                    # e.g. "W3 g64 asym" (+ "; lm_head W8 g128 asym")
    n_quantized: int               # linears stored packed
    n_ignored: int                 # linears stored in 16 bit
    n_shards: int
    bytes_total: int               # every tensor in the checkpoint
    bytes_quantized_layers: int    # packed weights + scales + zero points + shapes of quantized linears
    bf16_equivalent_bytes: int     # what the quantized linears' weights take in 16 bit
    compression_ratio: float       # bf16_equivalent_bytes / bytes_quantized_layers
    bits_per_weight: float         # 8 * bytes_quantized_layers / quantized weight count
    checkpoint_compression_ratio: float  # whole checkpoint: all-16-bit size / bytes_total
    n_carried: int = 0             # source tensors the model does not hold, copied as they are (carried.py)

    def __str__(self) -> str:
        carried = f", {self.n_carried} source tensors the model does not build carried as they are" \
            if self.n_carried else ""
        return (
            f"{self.path}: {self.scheme}, {self.n_quantized} quantized linears "
            f"({self.bits_per_weight:.3f} bits/weight, {self.compression_ratio:.2f}x vs 16-bit), "
            f"{self.n_ignored} in 16 bit{carried}, {self.bytes_total / 2**20:.1f} MiB in {self.n_shards} shard(s)"
        )


def save_quantized_checkpoint(
    model,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: str | Path,
    *,
    scheme: WeightScheme,
    ignore: Sequence[str],
    source_dir: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = 5 * 2**30,
) -> CheckpointSummary:
    """Write ``model`` with the linears in ``quantized`` packed, as a compressed-tensors checkpoint.

    ``quantized`` maps module names (as in ``model.named_modules()``) to their quantized weights;
    ``ignore`` names the Linear modules kept in 16 bit. Together they must cover every Linear.
    ``scheme`` is the decoder linears' scheme (config group ``Linear``); modules quantized with
    another (an 8-bit ``lm_head``) get a config group naming them.
    ``source_dir`` provides tokenizer/processor/chat-template/generation files, and the tensors of its weight files
    that ``model``'s load found it does not hold (:mod:`vlmptq.checkpoint.carried`); ``metadata`` is stored
    under ``quantization_config["vlmptq"]``. Refuses a non-empty ``out_dir`` unless ``overwrite``.
    """
    out = Path(out_dir).absolute()
    check_destination(out, overwrite, source_dir)
    if isinstance(max_shard_size, int) and max_shard_size <= 0:  # strings ("5GB") are parsed by HF
        raise ConfigError(f"max_shard_size={max_shard_size} must be a positive number of bytes.")
    modules = dict(model.named_modules())
    _check_modules(modules, quantized, ignore)
    qc_probe = build_quantization_config(scheme, [], metadata)  # validates metadata before any work
    del qc_probe

    state, quantized_keys, numel = _build_state_dict(model, modules, quantized)
    bytes_q = sum(_nbytes(state[k]) for k in quantized_keys)
    # Named config groups: modules with another scheme, and the LM head whatever its scheme (vLLM's
    # ParallelLMHead is not selected by the class target "Linear", which compressed-tensors'
    # nn.Linear matching would apply to it).
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    named = {n: qw.scheme for n, qw in quantized.items() if qw.scheme != scheme or modules[n] is head}
    state, ignore_disk, named_disk = _to_disk_names(model, state, quantized_keys, ignore, named)
    carried = CarriedTensors.of(model, source_dir)
    if carried is not None:
        state, ignore_disk = _add_carried(state, ignore_disk, carried)
    qconfig = build_quantization_config(scheme, ignore_disk, metadata, named_disk)

    bytes_total = sum(_nbytes(t) for t in state.values())
    bf16_bytes = 2 * numel
    all16 = bytes_total - bytes_q + bf16_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.vlmptq-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if source_dir is not None:
            _copy_side_files(Path(source_dir), tmp)
        n_shards = _write_weights(state, tmp, max_shard_size, carried)
        _write_configs(model, qconfig, tmp, Path(source_dir) / "config.json" if source_dir is not None else None)
        _fsync_tree(tmp)
        replace_directory(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    summary = CheckpointSummary(
        path=out,
        scheme=describe_schemes(scheme, named),
        n_quantized=len(quantized),
        n_ignored=len(set(ignore)),
        n_shards=n_shards,
        bytes_total=bytes_total,
        bytes_quantized_layers=bytes_q,
        bf16_equivalent_bytes=bf16_bytes,
        compression_ratio=bf16_bytes / bytes_q if bytes_q else 1.0,
        bits_per_weight=8 * bytes_q / numel if numel else 0.0,
        checkpoint_compression_ratio=all16 / bytes_total if bytes_total else 1.0,
        n_carried=len(carried.names) if carried is not None else 0,
    )
    logger.info("wrote %s", summary)
    return summary


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_destination(out: Path, overwrite: bool, source_dir: str | Path | None) -> None:
    """Refuse an unusable ``out`` before any work (callers run it before a long quantization too):
    a file, a non-empty directory without ``overwrite``, or the source checkpoint itself."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is not a directory; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"output directory {out} already exists and is not empty; pass --overwrite to replace it "
            f"or choose another --out."
        )
    if source_dir is not None:
        src = Path(source_dir).absolute()
        if not src.is_dir():
            raise CheckpointError(f"source_dir {src} is not a directory; pass the original model's folder.")
        if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
            raise CheckpointError(
                f"output directory {out} would replace the source checkpoint {src}; choose another --out."
            )


def _check_modules(
    modules: Mapping[str, torch.nn.Module],
    quantized: Mapping[str, QuantizedWeight],
    ignore: Sequence[str],
) -> None:
    """Every quantized entry is a Linear of the right shape and scheme; every Linear is accounted for."""
    if not quantized:
        raise ConfigError("nothing to save: no quantized modules were given.")
    for name, qw in quantized.items():
        mod = modules.get(name)
        if mod is None:
            raise ConfigError(
                f"quantized module {name!r} is not in the model; keys must be names from named_modules()."
            )
        weight = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear) or weight is None or weight.dim() != 2:
            raise ConfigError(
                f"quantized module {name!r} is a {type(mod).__name__}; only torch.nn.Linear can be packed."
            )
        if tuple(qw.shape) != tuple(weight.shape):
            raise ConfigError(
                f"module {name!r}: quantized shape {tuple(qw.shape)} != weight shape {tuple(weight.shape)}."
            )
    ignore_set = set(ignore)
    for name in ignore_set:
        if name not in modules:
            raise ConfigError(f"ignored module {name!r} is not in the model; use names from named_modules().")
        if name in quantized:
            raise ConfigError(
                f"module {name!r} is both quantized and in ignore; it must be one or the other."
            )
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    missing = [n for n in linears if n not in quantized and n not in ignore_set]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ConfigError(
            f"{len(missing)} Linear module(s) are neither quantized nor ignored: {shown}. Stock loaders "
            f"would expect packed weights for them; quantize them or add them to ignore."
        )


def _build_state_dict(model, modules, quantized) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Model-space state dict with each quantized ``<m>.weight`` replaced by its packed tensors."""
    from transformers.pytorch_utils import id_tensor_storage

    state = dict(model.state_dict())
    # A quantized linear's weight may be on the meta device (released after a lazily loaded layer was
    # quantized: its codes are all the checkpoint needs); any other meta tensor is missing data.
    released = {f"{n}.weight" for n in quantized
                if (w := state.get(f"{n}.weight")) is not None and w.device.type == "meta"}
    meta = [k for k, t in state.items() if t.device.type == "meta" and k not in released]
    if meta:
        raise CheckpointError(
            f"{len(meta)} tensors (e.g. {meta[0]!r}) are on the meta device (offloaded); load the whole "
            f"model into memory before saving."
        )
    storage = {}
    for k, t in state.items():
        if k not in released:  # meta tensors all share one storage id
            storage.setdefault(id_tensor_storage(t), []).append(k)
    keys: list[str] = []
    numel = 0
    for name, qw in quantized.items():
        wkey = f"{name}.weight"
        weight = state.pop(wkey, None)
        if weight is None:
            raise CheckpointError(
                f"{wkey!r} is not in the model's state dict; cannot replace it with packed tensors."
            )
        tied = [] if wkey in released else [k for k in storage[id_tensor_storage(weight)] if k != wkey]
        if tied:
            raise CheckpointError(
                f"{wkey!r} shares its storage with {tied[0]!r} (tied weights); a tied weight cannot be "
                f"packed. Leave {name!r} in 16 bit (add it to ignore) or untie the weights first."
            )
        for suffix, t in compress_weight(qw, scale_dtype=weight.dtype).items():
            state[f"{name}.{suffix}"] = t
            keys.append(f"{name}.{suffix}")
        numel += weight.numel()
    return state, keys, numel


def _to_disk_names(model, state, quantized_keys, ignore, named) -> tuple[dict[str, torch.Tensor], list[str],
                                                                        dict[str, WeightScheme]]:
    """Remove tied duplicates and revert transformers' weight conversions, as save_pretrained does.
    Returns the state, the ignore list and ``named`` (module -> scheme), with on-disk module names."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model_keys = list(model.state_dict().keys())
    quantized_modules = {k.rpartition(".")[0] for k in quantized_keys}
    check_no_converter(model, quantized_modules, set(model_keys) | set(state))
    ignore_disk = module_disk_names(model, ignore, model_keys)
    named_disk = {disk: named[m] for m, disk in module_disk_names(model, named, model_keys).items()} | named
    expected = disk_names(model, state.keys())

    state = remove_tied_weights_from_state_dict(state, model)
    reverted = revert_weight_conversion(model, state)
    for key in quantized_keys:
        disk = expected[key].name
        got = reverted.get(disk)
        if got is None or got.shape != state[key].shape or got.dtype != state[key].dtype:
            raise CheckpointError(
                f"transformers' weight conversion did not carry {key!r} to {disk!r} unchanged; this "
                f"architecture's save-time conversions are not supported for quantized layers."
            )
    # On-disk names are what vLLM and compressed-tensors' model-free tools match; transformers' own
    # compressed-tensors loader matches the in-memory (transformers 5) module names. List both
    # where they differ (in ignore and in named groups' targets): an entry that matches nothing is
    # harmless to all three.
    return reverted, sorted(set(ignore_disk.values()) | set(ignore)), named_disk


def _add_carried(state: dict[str, torch.Tensor], ignore: list[str], carried: CarriedTensors
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` with meta placeholders of the carried tensors (read when their shard is written), ``ignore`` with
    the linears among them."""
    clash = sorted(set(carried.names) & set(state))
    if clash:
        raise CheckpointError(
            f"{len(clash)} tensor(s) of the source files that the model reported not holding have the names of "
            f"tensors the model writes ({', '.join(clash[:3])}); the source names its tensors in a way this "
            "transformers version does not read back. Re-save the source with save_pretrained first."
        )
    return {**state, **carried.placeholders()}, sorted(set(ignore) | set(carried.linears()))


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, processor, chat template, generation config, ... (never weights or indexes)."""
    for f in sorted(src.iterdir()):
        name = f.name
        if not f.is_file() or name.startswith("."):
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json") or name in _WRITTEN:
            continue
        shutil.copy2(f, dst / name)
        logger.debug("copied %s", name)


def _write_weights(state: dict[str, torch.Tensor], dst: Path, max_shard_size: int | str,
                   carried: CarriedTensors | None = None) -> int:
    """Shards of ``state`` (meta placeholders: ``carried`` tensors, read here from the source files)."""
    import safetensors.torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from tqdm.auto import tqdm

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in tqdm(split.filename_to_tensors.items(), desc="Writing shards", disable=None):
        shard = {k: (carried.load(k) if state[k].is_meta else state[k].detach().to("cpu")).contiguous()
                 for k in names}
        # Looked up at call time so tests can make a shard write fail.
        safetensors.torch.save_file(shard, str(dst / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (dst / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(split.filename_to_tensors)


def _write_configs(model, qconfig: dict[str, Any], dst: Path, source_config: Path | None = None) -> None:
    """``config.json`` (the model's config, its dtype that of the weights written, plus ``quantization_config``) and
    ``generation_config.json``. The sub-configs' ``dtype`` stay as in ``source_config``: transformers sets them
    to the dtype the model was loaded in, and vLLM builds some towers from a sub-config as it stands (Gemma 4's
    vision tower: in bfloat16 under ``--dtype float32``), which the source model would not do."""
    import copy

    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(dst)
    path = dst / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"] = qconfig
    if source_config is not None and source_config.is_file():
        _keep_sub_config_dtypes(data, json.loads(source_config.read_text()))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(dst)


def _keep_sub_config_dtypes(data: dict[str, Any], source: dict[str, Any]) -> None:
    """Give each sub-config of ``data`` (a dict value holding a ``dtype``) the dtype of the same sub-config in
    ``source`` (``dtype`` or the older ``torch_dtype``), or none if the source gave it none."""
    for key, sub in data.items():
        if isinstance(sub, dict) and "dtype" in sub:
            src = source.get(key) if isinstance(source.get(key), dict) else {}
            dtype = src.get("dtype", src.get("torch_dtype"))
            if dtype is None and "dtype" not in src:
                del sub["dtype"]
            else:
                sub["dtype"] = dtype


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename makes them visible (a crash must not leave empty files)."""
    for f in root.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` into ``out``; an existing non-empty ``out`` is swapped out, then removed
    (readers see the old or the new directory, never neither). Also used by vlmptq.proxy's builds."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:  # created while we were writing
            raise CheckpointError(
                f"output directory {out} appeared while writing; pass --overwrite or choose another --out."
            )
        old = out.parent / f".{out.name}.vlmptq-old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # an empty directory is replaced atomically too
