"""Lazy loading: the decoder layers stay in the checkpoint files until the pipeline reaches them.

A model loaded whole holds every weight in host memory for the whole run: 144 GB for a 72B model in
bf16. Loaded lazily, host memory holds the rest of the model (embeddings, vision tower, head: ~7 GB
for Qwen2.5-VL-72B), the layer being quantized, and the finished layers' packed codes.

How: transformers loads the model with every decoder layer mapped to ``"disk"`` (accelerate's
offloading; for safetensors checkpoints nothing is copied, the offload index points into the
model's own files), then the offloading hooks are removed, so the layers' parameters stay on the
meta device and the model runs as a plain module. :class:`LazyLayers` keeps the index's reader and
puts a layer's tensors in place when the pipeline asks for it (``load``); once the layer is done,
``release`` puts the quantized linears' weights back on the meta device (the checkpoint writer takes
their packed codes; norms and biases stay); ``unload`` puts back all it read (``vlmptq compare``).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from vlmptq.errors import CheckpointError, UnsupportedModelError
from vlmptq.models.experts import experts_modules

logger = logging.getLogger(__name__)


def layer_device_map(skeleton: nn.Module, layers_prefix: str, num_layers: int) -> dict[str, str]:
    """Every decoder layer on ``"disk"``, everything else on ``"cpu"``: the ancestors of the layer list
    are split into their children (and their own parameters and buffers, if any)."""
    device_map: dict[str, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        if name == layers_prefix:
            device_map.update({f"{name}.{i}": "disk" for i in range(num_layers)})
            return
        if name and not layers_prefix.startswith(name + "."):
            device_map[name] = "cpu"
            return
        for pname, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[f"{name}.{pname}" if name else pname] = "cpu"
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", skeleton)
    return device_map


class LazyLayers:
    """Puts decoder layers' tensors in place on demand (``load``) and takes the quantized ones out again
    (``release``); see the module docstring."""

    def __init__(self, reader, prefix: str, offload_dir: tempfile.TemporaryDirectory):
        self.reader, self.prefix = reader, prefix
        self._offload_dir = offload_dir  # re-saved weights of non-safetensors checkpoints; removed with us
        self._read: dict[int, list[tuple[nn.Module, str]]] = {}  # layer -> (owner, attribute) read by load

    def load(self, index: int, layer: nn.Module) -> None:
        """Read layer ``index``'s parameters and buffers from the checkpoint (those still on meta)."""
        read = self._read.setdefault(index, [])
        for path, experts in experts_modules(layer).items():  # one linear per expert here, fused in the files
            if experts[0].gate_proj.weight.device.type != "meta":
                continue
            fused = [self._read_tensor(f"{self.prefix}.{index}.{path}.{t}") for t in ("gate_up_proj", "down_proj")]
            try:
                read += [(lin, "weight") for lin in experts.fill(*fused)]
            except UnsupportedModelError as e:
                raise CheckpointError(f"{self.prefix}.{index}.{path} in the model's files does not match its "
                                      f"config.json ({e}): use the config.json that came with these weights") from None
        for full, owner, attr, tensor in _tensors(layer, f"{self.prefix}.{index}"):
            if tensor.device.type != "meta":
                continue
            value = self._read_tensor(full)
            if tuple(value.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{full} is {tuple(value.shape)} in the model's files, but its config.json "
                                      f"describes {tuple(tensor.shape)}: use the config.json that came with these "
                                      "weights")
            value = value.to(tensor.dtype if tensor.is_floating_point() else value.dtype)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value
            read.append((owner, attr))

    def _read_tensor(self, full: str) -> torch.Tensor:
        try:
            return self.reader[full]
        except KeyError:
            raise UnsupportedModelError(f"{full} is not in the checkpoint files; the model cannot be loaded lazily "
                                        "(run with --no-lazy-load)") from None

    def release(self, layer: nn.Module, linears: list[str]) -> None:
        """Put the weights of the quantized ``linears`` (names inside ``layer``) back on the meta device."""
        for name in linears:
            lin = layer.get_submodule(name)
            lin.weight = nn.Parameter(torch.empty_like(lin.weight, device="meta"), requires_grad=False)

    def unload(self, index: int) -> None:
        """Put every tensor ``load`` read for layer ``index`` back on the meta device (a later ``load``
        reads them again); tensors the model computes itself (e.g. rotary tables) stay."""
        for owner, attr in self._read.pop(index, []):
            table = owner._parameters if attr in owner._parameters else owner._buffers
            meta = torch.empty_like(table[attr], device="meta")
            table[attr] = nn.Parameter(meta, requires_grad=False) if table is owner._parameters else meta

    def close(self) -> None:
        self._offload_dir.cleanup()


def choose_lazy_load(model_dir: str | Path, requested: bool | None) -> bool:
    """Whether to load lazily: as ``requested``, or (None) when the weight files would take more than 80%
    of the host memory available now. Either way a whole-model load that will not fit is named."""
    import psutil

    files = list(Path(model_dir).glob("*.safetensors")) or [
        f for f in Path(model_dir).iterdir() if f.suffix in (".bin", ".pt")]  # what transformers will read
    weights = sum(f.stat().st_size for f in files)
    available = psutil.virtual_memory().available
    short = weights > 0.8 * available
    sizes = f"the model's weights take {weights / 2**30:.1f} GiB and {available / 2**30:.1f} GiB of host memory " \
            "are available"
    if requested is None and short:
        logger.warning("%s: reading its decoder layers one at a time (--lazy-load; the checkpoint is the same, "
                       "--no-lazy-load loads it whole)", sizes)
        return True
    if requested is False and short:
        logger.warning("%s: loading the whole model may swap or fail; --lazy-load keeps one decoder layer of "
                       "them in memory at a time (--dry-run shows how much it needs)", sizes)
    return bool(requested)


def _tensors(module: nn.Module, prefix: str):
    for mname, mod in module.named_modules():
        for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None:
                yield ".".join(p for p in (prefix, mname, attr) if p), mod, attr, t


def load_lazily(auto_class, path: str | Path, dtype: torch.dtype, skeleton: nn.Module, layers_prefix: str,
                num_layers: int) -> tuple[nn.Module, LazyLayers]:
    """``auto_class.from_pretrained(path)`` with the decoder layers left in the checkpoint files."""
    from vlmptq.models.adapters import check_loading_info, record_unbuilt

    try:
        from accelerate.hooks import remove_hook_from_module
    except ImportError as e:
        raise UnsupportedModelError(f"--lazy-load needs the accelerate package ({e}); pip install accelerate") from e
    if not any(Path(path).glob("*.safetensors")):
        logger.warning("%s has no safetensors files: --lazy-load first re-saves its decoder layers under %s "
                       "(as much disk as the layers take); converting the checkpoint to safetensors avoids that",
                       path, tempfile.gettempdir())
    offload = tempfile.TemporaryDirectory(prefix="vlmptq-offload-")
    try:
        quiet = logging.getLogger("accelerate.big_modeling")  # "parameters on the meta device": intended
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():  # accelerate names parameter keys (e.g. image_newline) "unmatched"
                warnings.filterwarnings("ignore", message="The following device_map keys do not match")
                model, info = auto_class.from_pretrained(
                    str(path), dtype=dtype, offload_folder=offload.name, ignore_mismatched_sizes=True,
                    output_loading_info=True, device_map=layer_device_map(skeleton, layers_prefix, num_layers))
        finally:
            quiet.setLevel(level)
        record_unbuilt(model, check_loading_info(path, info, model))
        readers = {id(h.weights_map.dataset): h.weights_map.dataset for m in model.modules()
                   if (h := getattr(m, "_hf_hook", None)) is not None and getattr(h, "weights_map", None) is not None}
        remove_hook_from_module(model, recurse=True)
        if len(readers) != 1:
            raise UnsupportedModelError(f"lazy loading found {len(readers)} offload readers, expected 1; run "
                                        "with --no-lazy-load")
        if hasattr(model, "hf_device_map"):  # the model now runs as a plain module, on the device we move it to
            del model.hf_device_map
    except BaseException:
        offload.cleanup()
        raise
    model.eval()
    model.requires_grad_(False)
    return model, LazyLayers(next(iter(readers.values())), layers_prefix, offload)
