"""The vLLM linear method for vlmptq layers: checkpoint parameters in, kernel tensors out.

Parameters (vLLM's own classes, so fused qkv / gate_up shards and tensor-parallel slices load
through vLLM's loaders; layouts in :mod:`vllm_plugin.validation`, per partition):
    weight_packed      PackedvLLMParameter   int32 [N_p, ceil(K_p*b/32)]   packed along K (dim 1)
    weight_scale       GroupQuantScaleParameter [N_p, G_p]  (per-channel + row parallel: replicated
                       ChannelQuantScaleParameter [N_p, 1])
    weight_zero_point  PackedvLLMParameter   int32 [ceil(N_p*b/32), G_p]   packed along N (dim 0)
    weight_shape       BasevLLMParameter     int64 [2]
The LM head (a ``ParallelLMHead``, rows = the vocabulary padded per rank) takes the same tensors
through :func:`_load_vocab_rows` instead of vLLM's embedding loader.
Every checkpoint tensor is checked (shape, dtype) before vLLM copies it, and converted from the old
padded 3-bit layout to the dense one there, before any tensor-parallel slicing (slicing is only
word-exact in the dense layout). After loading, missing tensors are reported by name, then the
chosen kernel repacks the partition and its tensors replace the checkpoint parameters.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from fractions import Fraction

import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
)
from vllm.platforms import current_platform

from vlmptq.checkpoint.packing import pack_columns, pack_rows, unpack_columns, unpack_rows_padded3
from vlmptq.errors import CheckpointError
from vllm_plugin.kernels import WNA16Kernel, WNA16LayerConfig, choose_kernel_explained
from vllm_plugin.validation import ServingScheme, check_tensor, validate_partition

# Under vLLM's logger tree, so vLLM's handler prints our messages in its own format.
logger = logging.getLogger(f"vllm.plugins.{__name__}")

_QKV_INDEX = {"q": 0, "k": 1, "v": 2}
_KERNEL_PREFIX = "vlmptq_"
_announced: set[tuple[str, str]] = set()


@register_weight_loader_v2_supported_method
class VlmptqLinearMethod(LinearMethodBase):
    """Weight-only 2/3/4/8-bit linear for one layer (vLLM creates one method per layer)."""

    def __init__(
        self,
        scheme: ServingScheme,
        layer_name: str,
        packed_modules_mapping: Mapping[str, list[str]],
    ):
        self.scheme = scheme
        self.layer_name = layer_name
        self.packed_modules_mapping = packed_modules_mapping
        self.kernel_cls: type[WNA16Kernel] | None = None
        self.kernel_rejections: list[str] = []  # why each better kernel refused this layer
        self.kernel: WNA16Kernel | None = None
        self.kernel_keys: tuple[str, ...] = ()

    # ------------------------------------------------------------------ create

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        s, b = self.scheme, self.scheme.bits
        tp_size = get_tensor_model_parallel_world_size()
        validate_partition(
            self.layer_name,
            s,
            input_size,
            input_size_per_partition,
            output_partition_sizes,
            tp_size,
        )
        n_p, k_p = sum(output_partition_sizes), input_size_per_partition
        row_parallel = input_size != input_size_per_partition
        channelwise = s.group_size == -1
        replicate_scales = (
            channelwise and row_parallel
        )  # one [N, 1] scale column serves every K shard
        groups = 1 if channelwise else k_p // s.group_size

        layer.input_size = input_size
        layer.input_size_per_partition = k_p
        layer.output_size_per_partition = n_p
        layer.output_partition_sizes = output_partition_sizes
        layer.params_dtype = params_dtype
        layer.vlmptq_loaded = set()  # (param, shard id) pairs seen by the loaders

        self.kernel_config = WNA16LayerConfig(
            bits=b,
            group_size=k_p if channelwise else s.group_size,
            symmetric=s.symmetric,
            in_features=k_p,
            out_features=n_p,
            act_dtype=params_dtype,
            device_type=current_platform.device_type,
        )
        self.kernel_cls, self.kernel_rejections = choose_kernel_explained(self.kernel_config, self.layer_name)

        inner = extra_weight_attrs["weight_loader"]
        pack = Fraction(32, b)
        if isinstance(layer, VocabParallelEmbedding):  # the LM head: rows are the (padded) vocabulary
            loader = lambda name: self._make_loader(  # noqa: E731
                layer, name, functools.partial(_load_vocab_rows, layer, name, b))
        else:
            loader = lambda name: self._make_loader(layer, name, inner)  # noqa: E731
        weight = PackedvLLMParameter(
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=pack,
            weight_loader=loader("weight_packed"),
            data=torch.empty(n_p, math.ceil(k_p * b / 32), dtype=torch.int32),
        )
        scale_data = torch.empty(n_p, groups, dtype=params_dtype)
        if replicate_scales:
            scale = ChannelQuantScaleParameter(
                output_dim=0, data=scale_data, weight_loader=loader("weight_scale")
            )
        else:
            scale = GroupQuantScaleParameter(
                output_dim=0, input_dim=1, data=scale_data, weight_loader=loader("weight_scale")
            )
        shape = BasevLLMParameter(
            data=torch.empty(2, dtype=torch.int64), weight_loader=loader("weight_shape")
        )
        layer.register_parameter("weight_packed", weight)
        layer.register_parameter("weight_scale", scale)
        layer.register_parameter("weight_shape", shape)
        if not s.symmetric:
            zp_data = torch.zeros(math.ceil(n_p * b / 32), groups, dtype=torch.int32)
            if replicate_scales:
                zp = PackedColumnParameter(
                    output_dim=0,
                    packed_dim=0,
                    packed_factor=pack,
                    data=zp_data,
                    weight_loader=loader("weight_zero_point"),
                )
            else:
                zp = PackedvLLMParameter(
                    input_dim=1,
                    output_dim=0,
                    packed_dim=0,
                    packed_factor=pack,
                    data=zp_data,
                    weight_loader=loader("weight_zero_point"),
                )
            layer.register_parameter("weight_zero_point", zp)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        """vLLM ties the LM head to the input embedding when the config says
        ``tie_word_embeddings``; a packed head cannot share the embedding's 16-bit weight."""
        raise CheckpointError(
            f"{self.layer_name}: the checkpoint quantizes the LM head ({self.scheme.describe()}) but its "
            "config ties it to the input embeddings (tie_word_embeddings: true). Set tie_word_embeddings to "
            "false in config.json (vlmptq writes that when it quantizes the head and the embedding keeps "
            "its 16-bit weight), or keep lm_head in the quantization_config's ignore list."
        )

    def _param_names(self) -> tuple[str, ...]:
        names = ("weight_packed", "weight_scale", "weight_shape")
        return names if self.scheme.symmetric else names + ("weight_zero_point",)

    # ------------------------------------------------------------------ load

    def _make_loader(self, layer: torch.nn.Module, name: str, inner: Callable) -> Callable:
        def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
            shard_id = args[0] if args else kwargs.get("loaded_shard_id")
            loaded_weight = self._check_and_convert(layer, name, shard_id, loaded_weight)
            inner(param, loaded_weight, *args, **kwargs)
            for sid in _expand_shard_ids(layer, shard_id):
                layer.vlmptq_loaded.add((name, sid))

        return load

    def _check_and_convert(self, layer, name: str, shard_id, t: torch.Tensor) -> torch.Tensor:
        tensor_name = self._tensor_name(name, shard_id)
        if name in ("weight_packed", "weight_zero_point") and t.dtype != torch.int32:
            raise CheckpointError(
                f"{tensor_name}: dtype {t.dtype}, expected torch.int32 (packed codes)."
            )
        if name == "weight_scale" and not t.dtype.is_floating_point:
            raise CheckpointError(
                f"{tensor_name}: dtype {t.dtype}, expected a float dtype (scales)."
            )
        rows = _checkpoint_rows(layer, shard_id)
        k = layer.input_size
        padded = check_tensor(tensor_name, name, t.shape, self.scheme, rows, k)
        if (
            name == "weight_shape"
            and rows is not None
            and [int(v) for v in t.tolist()] != [rows, k]
        ):
            raise CheckpointError(
                f"{tensor_name}: says the layer is {t.tolist()}, but the model's layer is "
                f"[{rows}, {k}] "
                f"(out_features, in_features); the checkpoint does not belong to this model config."
            )
        if padded:  # compressed-tensors <= 0.17's 3-bit layout: make it dense before vLLM slices it
            if name == "weight_packed":
                t = pack_rows(unpack_rows_padded3(t, k), 3)
            else:
                t = pack_columns(unpack_columns(t, 3, rows), 3)
        return t

    def _tensor_name(self, param: str, shard_id) -> str:
        """Unfused (checkpoint-side) tensor name (vLLM naming), e.g. ``...q_proj.weight_packed``."""
        if shard_id is None or isinstance(shard_id, tuple):
            return f"{self.layer_name}.{param}"
        for fused, parts in self.packed_modules_mapping.items():
            if self.layer_name.endswith(fused):
                idx = _QKV_INDEX.get(shard_id, shard_id)
                if isinstance(idx, int) and idx < len(parts):
                    return f"{self.layer_name[: -len(fused)]}{parts[idx]}.{param}"
        return f"{self.layer_name}[shard {shard_id}].{param}"

    # ------------------------------------------------------------------ after loading

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        missing = [
            self._tensor_name(name, sid)
            for name in self._param_names()
            for sid in _expected_shard_ids(layer)
            if (name, sid) not in layer.vlmptq_loaded
        ]
        if missing:
            mtp = (" It is a multi-token-prediction (speculative decoding) layer, and the checkpoint holds none: its "
                   "source had none, or a vlmptq older than 2026-11-29 left them out (re-quantize); or serve "
                   "without --speculative-config.") if self.layer_name.startswith("mtp.") else ""
            raise CheckpointError(
                f"{self.layer_name}: the checkpoint has no tensor(s) {', '.join(missing)}. A "
                f"{self.scheme.describe()} linear needs {', '.join(self._param_names())} per "
                "(unfused) "
                f"layer; the checkpoint is incomplete or the layer should be in `ignore`.{mtp}"
            )
        assert self.kernel_cls is not None
        self.kernel = self.kernel_cls(self.kernel_config)
        zp = layer.weight_zero_point.data if not self.scheme.symmetric else None
        tensors = self.kernel.prepare(layer.weight_packed.data, layer.weight_scale.data, zp)
        for name in self._param_names():
            delattr(layer, name)
        self.kernel_keys = tuple(tensors)
        for key, t in tensors.items():
            layer.register_parameter(
                _KERNEL_PREFIX + key, torch.nn.Parameter(t, requires_grad=False)
            )
        del layer.vlmptq_loaded
        tag = (self.kernel_cls.name, self.scheme.describe())
        if tag not in _announced:
            _announced.add(tag)
            logger.info("vlmptq: %s layers run on the %r kernel", tag[1], tag[0])
            slow = slow_path_warning(self.kernel_cls.name, self.kernel_config, self.kernel_rejections)
            if slow:
                logger.warning(slow)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        tensors = {k: getattr(layer, _KERNEL_PREFIX + k) for k in self.kernel_keys}
        return self.kernel.apply(tensors, x, bias)


def slow_path_warning(kernel: str, config: WNA16LayerConfig, rejections: list[str]) -> str | None:
    """What to tell a user whose GPU layers landed on the torch reference (it dequantizes the whole
    weight on every call: slower than serving the model unquantized), with every faster kernel's reason."""
    if kernel != "reference" or config.device_type == "cpu":
        return None
    return (
        f"vlmptq: W{config.bits} layers run on the torch reference kernel on {config.device_type} "
        "(unpack + dequantize every call: slower than the unquantized model) because "
        + "; ".join(rejections)
        + ". Quantize with 2/3/4/8 bits, bf16/fp16 activations and a group size that is a multiple of 32 "
        "(or per-channel) for the Triton kernels, or try stock vLLM's own kernels for this checkpoint "
        "(--quantization compressed-tensors)."
    )


def _load_vocab_rows(
    layer: VocabParallelEmbedding, name: str, bits: int, param: torch.nn.Parameter, t: torch.Tensor
) -> None:
    """Load this rank's rows of an LM-head tensor (checkpoint rows = the original vocabulary) into
    its padded partition; padding rows get code 0 and scale 0, so their logits are 0 (vLLM drops
    them). Zero points are packed along the vocabulary: unpacked, sliced and repacked here, since a
    rank's first row need not start a packed word. vLLM's embedding loader assumes integer packing
    factors and slices whole words."""
    if name == "weight_shape":
        param.data.copy_(t)
        return
    idx = layer.shard_indices
    start, end = idx.org_vocab_start_index, idx.org_vocab_end_index
    if name == "weight_zero_point":
        codes = unpack_columns(t, bits, layer.org_vocab_size)[start:end]
        full = torch.zeros(layer.num_embeddings_per_partition, codes.shape[1], dtype=codes.dtype)
        full[: end - start] = codes
        param.data.copy_(pack_columns(full, bits))
        return
    param.data[: end - start].copy_(t[start:end])
    param.data[end - start :].zero_()


def _checkpoint_rows(layer: torch.nn.Module, shard_id) -> int | None:
    """Rows of this shard's checkpoint tensor before tensor-parallel slicing (None: unknown)."""
    if isinstance(layer, VocabParallelEmbedding):
        return layer.org_vocab_size
    if isinstance(layer, QKVParallelLinear):
        if shard_id in _QKV_INDEX:
            heads = layer.total_num_heads if shard_id == "q" else layer.total_num_kv_heads
            size = layer.v_head_size if shard_id == "v" else layer.head_size
            return heads * size
        return None
    if isinstance(layer, MergedColumnParallelLinear):
        return layer.output_sizes[shard_id] if isinstance(shard_id, int) else None
    return layer.output_size


def _expected_shard_ids(layer: torch.nn.Module) -> tuple:
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)


def _expand_shard_ids(layer: torch.nn.Module, shard_id) -> tuple:
    if shard_id is None:
        return _expected_shard_ids(layer)  # a fused tensor on disk fills every shard
    if isinstance(shard_id, tuple):
        return shard_id
    return (shard_id,)
