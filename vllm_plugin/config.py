"""The ``vlmptq`` quantization config for vLLM: which checkpoints we claim, which layers we take.

Claim rule (:meth:`VlmptqConfig.override_quantization_method`): a compressed-tensors
``pack-quantized`` checkpoint is served by this plugin when the user asks for it
(``--quantization vlmptq``) or when its ``quantization_config`` carries our marker block
``"vlmptq"`` and the user asked for nothing else. ``--quantization compressed-tensors`` (or
disabling plugins with ``VLLM_PLUGINS=""``) keeps vLLM's stock path for the same checkpoint.

Layer rule (:meth:`VlmptqConfig.get_quant_method`): linears named in ``ignore`` (matched with
vLLM's compressed-tensors helpers, after the model's ``hf_to_vllm_mapper`` renamed the names, and
across fused qkv / gate_up shards, by the model's mapping or vLLM's usual ``VLLM_FUSED_LINEARS``) and linears
no config group targets get ``UnquantizedLinearMethod``; the others get
:class:`~vllm_plugin.linear.VlmptqLinearMethod` with their group's scheme. The LM head
(``ParallelLMHead``) is quantized when a group targets it by name (vlmptq writes
``re:^(.*\\.)?lm_head$``, which also matches vLLM's ``language_model.lm_head``; the class target
``Linear`` does not select it) and otherwise keeps vLLM's unquantized embedding method.
Other non-linear layers (embeddings, attention) stay vLLM's defaults.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from compressed_tensors.quantization import QuantizationArgs
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
    find_matched_target,
    should_ignore_layer,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vlmptq.checkpoint.config import VLLM_FUSED_LINEARS, name_target, named_module
from vlmptq.errors import CheckpointError, ConfigError
from vllm_plugin.validation import ServingScheme

if TYPE_CHECKING:
    from vllm.model_executor.models.utils import WeightsMapper

# Under vLLM's logger tree, so vLLM's handler prints our messages in its own format.
logger = logging.getLogger(f"vllm.plugins.{__name__}")

NAME = "vlmptq"
_USUAL_FUSED = {k: list(v) for k, v in VLLM_FUSED_LINEARS.items()}  # vLLM's helpers take lists
MARKER = "vlmptq"  # key of our block in quantization_config (stock loaders ignore it)
_QUANT_METHOD = "compressed-tensors"
_FORMAT = "pack-quantized"


def claims_checkpoint(hf_quant_cfg: dict[str, Any] | None, user_quant: str | None) -> bool:
    """Whether the plugin serves this checkpoint (see module docstring). Raises if the user asked
    for ``vlmptq`` on a checkpoint that is not compressed-tensors."""
    if user_quant not in (None, NAME):
        return False
    is_ct = isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == _QUANT_METHOD
    if user_quant == NAME:
        if not is_ct:
            method = hf_quant_cfg.get("quant_method") if isinstance(hf_quant_cfg, dict) else None
            raise ConfigError(
                f"--quantization {NAME} serves compressed-tensors pack-quantized checkpoints, but "
                "this "
                f"checkpoint's quantization_config.quant_method is {method!r}. Drop the flag to "
                "use "
                f"vLLM's own loader for it, or quantize the model with vlmptq."
            )
        return True
    return is_ct and MARKER in hf_quant_cfg


def _add_renamed_twins(target_map: dict[str, Any], mapper: WeightsMapper) -> None:
    """vlmptq names a module by a regex of its checkpoint name (``name_target``), which a model that renames its
    prefixes (``model.language_model.`` -> ``language_model.model.``) would never match, and vLLM renames plain
    names only: add each such target's renamed twin, with the same value (in place)."""
    for target, value in list(target_map.items()):
        module = named_module(target)
        if module is not None and (m := mapper._map_name(module)) not in (None, module):
            target_map.setdefault(name_target(m), value)


def parse_config_groups(config: dict[str, Any]) -> dict[str, ServingScheme]:
    """``{target: scheme}`` from the checkpoint's ``config_groups`` (weight-only int packed)."""
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(
            "quantization_config has no config_groups; a vlmptq checkpoint lists its weight "
            "scheme(s) "
            "there (re-export it with vlmptq)."
        )
    out: dict[str, ServingScheme] = {}
    for gname, group in groups.items():
        where = f"quantization_config.config_groups.{gname}"
        if not isinstance(group, dict):
            raise CheckpointError(
                f"{where} is {group!r}; expected an object with targets and weights."
            )
        fmt = group.get("format") or config.get("format")
        if fmt != _FORMAT:
            raise CheckpointError(
                f"{where}: format {fmt!r} is not served by vlmptq; it serves {_FORMAT!r}."
            )
        if group.get("input_activations") or group.get("output_activations"):
            raise CheckpointError(
                f"{where}: activation quantization is set; vlmptq serves weight-only (A16)."
            )
        try:
            args = QuantizationArgs.model_validate(group.get("weights"))
        except ValueError as e:
            raise CheckpointError(
                f"{where}.weights is not a valid compressed-tensors scheme: {e}"
            ) from e
        strategy = str(getattr(args.strategy, "value", args.strategy))
        if str(getattr(args.type, "value", args.type)) != "int":
            raise CheckpointError(
                f"{where}.weights.type is {args.type!r}; vlmptq serves int weights."
            )
        if strategy not in ("group", "channel"):
            raise CheckpointError(
                f"{where}.weights.strategy is {strategy!r}; vlmptq serves 'group' and 'channel'."
            )
        if args.actorder not in (None, "static", "weight"):
            raise CheckpointError(
                f"{where}.weights.actorder is {args.actorder!r} (needs g_idx); vlmptq serves "
                "checkpoints "
                f"without activation reordering or with static reordering."
            )
        try:
            scheme = ServingScheme(
                bits=int(args.num_bits),
                group_size=-1 if strategy == "channel" else int(args.group_size),
                symmetric=bool(args.symmetric),
            )
        except ConfigError as e:
            raise CheckpointError(f"{where}.weights: {e}") from e
        for target in group.get("targets") or ():
            out[target] = scheme
    if not out:
        raise CheckpointError("quantization_config.config_groups has no targets; nothing to serve.")
    return out


class VlmptqConfig(QuantizationConfig):
    """vLLM quantization config for vlmptq (compressed-tensors ``pack-quantized``) checkpoints."""

    def __init__(
        self,
        target_schemes: dict[str, ServingScheme] | None = None,
        ignore: list[str] | None = None,
        raw: dict[str, Any] | None = None,
    ):
        if target_schemes is None:  # vLLM builds a config without arguments for a model without quantization_config
            raise CheckpointError(
                "--quantization vlmptq serves quantized checkpoints, and this model's config.json has no "
                "quantization_config: it holds 16-bit weights. Quantize it first (vlmptq quantize --model MODEL "
                "--out CKPT) and serve CKPT, or serve this model without --quantization."
            )
        super().__init__()
        self.target_schemes = target_schemes
        self.ignore = list(ignore or [])
        self.raw = raw or {}
        self._mapper: WeightsMapper | None = None
        self._stock = None  # vLLM's compressed-tensors config of the checkpoint, for MoE layers

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the torch reference kernel runs on any GPU; kernels check finer limits per layer

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VlmptqConfig:
        if config.get("quant_method") != _QUANT_METHOD:
            raise CheckpointError(
                f"quantization_config.quant_method is {config.get('quant_method')!r}; vlmptq "
                "serves "
                f"{_QUANT_METHOD!r} checkpoints."
            )
        status = config.get("quantization_status", "compressed")
        if status != "compressed":
            raise CheckpointError(
                f"quantization_config.quantization_status is {status!r}; vlmptq serves packed "
                f"('compressed') checkpoints."
            )
        if config.get("kv_cache_scheme"):
            raise CheckpointError(
                "quantization_config.kv_cache_scheme is set; vlmptq does not serve KV quantization."
            )
        return cls(parse_config_groups(config), list(config.get("ignore") or []), config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        return NAME if claims_checkpoint(hf_quant_cfg, user_quant) else None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        """Rename layer-path targets and ignore entries as the model renames its weights (regexes
        ``re:...`` and class names such as ``Linear`` are kept), like vLLM's compressed-tensors."""
        self._mapper = hf_to_vllm_mapper

        def rename(target: str) -> str | None:
            if "." in target and not target.startswith("re:"):
                return hf_to_vllm_mapper._map_name(target)
            return target

        self.target_schemes = {
            n: s for t, s in self.target_schemes.items() if (n := rename(t)) is not None
        }
        _add_renamed_twins(self.target_schemes, hf_to_vllm_mapper)
        self.ignore = [n for t in self.ignore if (n := rename(t)) is not None]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

        if isinstance(layer, RoutedExperts):
            return self._experts_method(layer, prefix)
        is_head = isinstance(layer, ParallelLMHead)
        if not isinstance(layer, LinearBase) and not is_head:
            return None  # embeddings, attention: vLLM's defaults
        from vllm_plugin.linear import VlmptqLinearMethod

        if self._ignored(prefix):
            return None if is_head else UnquantizedLinearMethod()
        target = self._target(layer, prefix)
        if target is None:
            logger.debug(
                "vlmptq: %s matches no config group target; serving it unquantized", prefix
            )
            return None if is_head else UnquantizedLinearMethod()
        return VlmptqLinearMethod(self.target_schemes[target], prefix, self.packed_modules_mapping)

    def _experts_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """A mixture-of-experts block (one ``RoutedExperts`` layer): its experts' scheme, read through the names
        of expert 0's projections as the checkpoint holds them, served by :func:`vllm_plugin.moe.experts_method`;
        None (vLLM's unquantized MoE method) when they are kept in 16-bit."""
        from vllm_plugin.moe import experts_method

        names = [f"{prefix}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        ignored = [self._ignored(n) for n in names]
        if all(ignored):
            return None
        found = [self._name_or_class_scheme(n) for n in names]
        if any(ignored) or len(set(found)) != 1 or None in found:
            got = ", ".join(f"{n}: {'ignored' if i else s.describe() if s else 'no target'}"
                            for n, s, i in zip(names, found, ignored))
            raise CheckpointError(
                f"{prefix}: the experts' projections have different schemes or are partly ignored ({got}); vLLM "
                "serves a block's experts as one layer with one scheme. Re-quantize with vlmptq, which keeps them "
                "alike")
        return experts_method(layer, prefix, found[0], self._stock_config())

    def _name_or_class_scheme(self, name: str) -> ServingScheme | None:
        """The scheme of a module vLLM does not build as its own layer (an expert's projection): a target naming it
        (vLLM's matcher), else the class target ``Linear``."""
        target = find_matched_target(name, torch.nn.Module(), self.target_schemes.keys())
        return self.target_schemes[target] if target is not None else self.target_schemes.get("Linear")

    def _stock_config(self):
        """vLLM's compressed-tensors config of the same checkpoint (its MoE methods read it), renamed as ours."""
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )

        if self._stock is None:
            stock = CompressedTensorsConfig.from_config(self.raw)
            if self._mapper is not None:
                stock.apply_vllm_mapper(self._mapper)
                _add_renamed_twins(stock.target_scheme_map, self._mapper)
            stock.packed_modules_mapping = self.packed_modules_mapping
            self._stock = stock
        return self._stock

    def _ignored(self, prefix: str) -> bool:
        """In ``ignore`` by name, or shard by shard through the model's fused mapping, or through vLLM's usual
        fused names (``VLLM_FUSED_LINEARS``). The second covers a model class without a
        ``packed_modules_mapping`` (vLLM 0.32's LLaVA-OneVision: its ignored vision ``qkv_proj`` was taken as
        quantized) and one whose mapping describes another part of the model (GLM-4.1V / 4.5V map
        ``gate_up_proj`` to itself, the language model's fused tensor on disk, while the vision tower's
        ``gate_up_proj`` is stored as ``gate_proj`` + ``up_proj``). Ignore means "served unquantized", so an
        explicit entry for every shard is evidence enough."""
        if should_ignore_layer(prefix, ignore=self.ignore, fused_mapping=self.packed_modules_mapping):
            return True
        return should_ignore_layer(prefix, ignore=self.ignore, fused_mapping=_USUAL_FUSED)

    def _target(self, layer: torch.nn.Module, prefix: str) -> str | None:
        return find_matched_target(
            prefix, layer, self.target_schemes.keys(), self.packed_modules_mapping
        )
