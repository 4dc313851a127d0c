"""Model adapters: where a model's decoder layers are, and which tokens are vision tokens.

An adapter answers three questions for the pipeline, so that the pipeline stays architecture-free:
    decoder_layers()     the language model's decoder layers (an nn.ModuleList) and its module path;
    vision_token_ids()   token ids whose positions receive vision features (the per-token mask);
    load(path, dtype)    the transformers class that loads the checkpoint.
Everything that is an ``nn.Linear`` outside the decoder layers (vision tower, projector/merger,
``lm_head``) stays in 16-bit, except the ``lm_head`` when asked for (``lm_head()``, ``final_norm()``:
its input; ``untie_lm_head()``: tied embeddings stay 16-bit); that list is computed, not
hand-written, so it always holds the real module names. Inside the decoder layers, the routers of
mixture-of-experts blocks and the linears an adapter names in ``kept_16bit`` stay 16-bit too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from vlmptq.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from vlmptq.models.lazy import LazyLayers

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type["ModelAdapter"]] = {}
KEPT_16BIT = "vlmptq_kept_16bit"  # attribute set on a decoder linear the model keeps in 16-bit (kept_16bit)


def kept_16bit_linears(layer: nn.Module) -> list[str]:
    """Paths (inside the decoder ``layer``) of the linears its model keeps in 16-bit, marked at load: its
    mixture-of-experts routers and the adapter's ``kept_16bit``."""
    return [n for n, m in layer.named_modules() if getattr(m, KEPT_16BIT, False)]


def register_adapter(*model_types: str) -> Callable[[type], type]:
    """Register an adapter class for the given ``config.model_type`` values."""

    def deco(cls: type) -> type:
        for mt in model_types:
            if mt in ADAPTERS:
                raise ValueError(f"model type {mt!r} already has an adapter")
            ADAPTERS[mt] = cls
        cls.model_types = model_types
        return cls

    return deco


class ModelAdapter:
    """Base adapter for transformers VLMs whose text model sits at ``model.model.<text_attr>``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    text_attr: ClassVar[str] = "language_model"  # attribute of model.model holding the text model
    auto_class: ClassVar[str] = "AutoModelForImageTextToText"
    text_only: ClassVar[bool] = False  # no vision tokens: calibrates on text (vlmptq.calib.text)
    token_id_keys: ClassVar[tuple[str, ...]] = ("image_token_id", "image_token_index", "video_token_id",
                                                "video_token_index")
    # Linears inside the decoder layers that stay 16-bit whatever the flags (regexes searched in their path inside
    # a layer): ones vLLM builds without a quantization method or could not load packed, so that a checkpoint
    # quantizing them would not serve. Marked at load (``KEPT_16BIT``), never solved, listed in ``ignore``.
    kept_16bit: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # -------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype) -> nn.Module:
        import transformers

        auto = getattr(transformers, cls.auto_class)
        model, info = auto.from_pretrained(str(path), dtype=dtype, low_cpu_mem_usage=True, ignore_mismatched_sizes=True,
                                           output_loading_info=True)
        record_unbuilt(model, check_loading_info(path, info, model))
        model.eval()
        model.requires_grad_(False)
        cls.prepare(model)
        return model

    @classmethod
    def prepare(cls, model: nn.Module) -> nn.Module:
        """What every loaded model (and skeleton) goes through before use: fused mixture-of-experts modules
        in the decoder layers become one linear per expert projection (``vlmptq.models.experts``), and the
        routers beside them and the linears named by ``kept_16bit`` are marked (``KEPT_16BIT``)."""
        from vlmptq.models.experts import routers, unfuse_experts

        layers = cls(model).decoder_layers()[1]
        unfuse_experts(layers)
        for layer in layers:
            for path in routers(layer):  # a linear to vLLM (and to transformers for Llama 4), never quantized
                setattr(layer.get_submodule(path), KEPT_16BIT, True)
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear) and any(re.search(p, name) for p in cls.kept_16bit):
                    setattr(module, KEPT_16BIT, True)
        return model

    @classmethod
    def skeleton(cls, path: str | Path, dtype: torch.dtype) -> nn.Module:
        """The model's module tree on the meta device from its config alone (no weight is read), marked with the
        tensors of its files it would not hold, from their headers (:func:`unbuilt_in_files`)."""
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
            with torch.device("meta"):
                model = getattr(transformers, cls.auto_class).from_config(config, dtype=dtype)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:  # a config transformers rejects
            raise UnsupportedModelError(
                f"transformers cannot build the model {Path(path) / 'config.json'} describes ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); use the config.json that came "
                "with the weights") from None
        record_unbuilt(model, unbuilt_in_files(path, model))
        return cls.prepare(model)

    # -------------------------------------------------------------- structure
    def text_model(self) -> nn.Module:
        return getattr(self.model.model, self.text_attr)

    def decoder_layers(self) -> tuple[str, nn.ModuleList]:
        """(module path, the decoder layers) of the language model."""
        layers = self.text_model().layers
        for name, module in self.model.named_modules():
            if module is layers:
                return name, layers
        raise UnsupportedModelError("could not locate the decoder layers in the model")  # pragma: no cover

    def vision_token_ids(self) -> set[int]:
        """Ids of the placeholder tokens that vision features replace."""
        return self.vision_token_ids_of(self.model.config)

    @classmethod
    def vision_token_ids_of(cls, config) -> set[int]:
        """The same from a model config alone (no weights loaded)."""
        ids = set()
        for key in cls.token_id_keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and value >= 0:
                ids.add(value)
        return ids

    def frozen_linears(self) -> list[str]:
        """Names of every nn.Linear outside the decoder layers (kept in 16-bit) and of those inside them marked
        ``KEPT_16BIT`` at load: the mixture-of-experts routers (linears to vLLM, which must not quantize them) and
        the adapter's ``kept_16bit``."""
        prefix, layers = self.decoder_layers()
        return [n for n, m in self.model.named_modules()
                if isinstance(m, nn.Linear) and not n.startswith(prefix + ".")] + [
            f"{prefix}.{li}.{n}" for li, layer in enumerate(layers) for n in kept_16bit_linears(layer)]

    def lm_head(self) -> tuple[str, nn.Linear]:
        """(module path, the output projection) of the language model."""
        head = self.model.get_output_embeddings()
        for name, module in self.model.named_modules():
            if module is head and isinstance(head, nn.Linear):
                return name, head
        raise UnsupportedModelError(
            f"{type(self.model).__name__} has no nn.Linear output projection (lm_head); it cannot be quantized. "
            "Leave it in 16-bit (omit --lm-head-bits)."
        )

    def final_norm(self) -> nn.Module:
        """The norm between the last decoder layer and the lm_head (the head's input is its output)."""
        norm = getattr(self.text_model(), "norm", None)
        if not isinstance(norm, nn.Module):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: the text model has no final `norm` module, so the lm_head's "
                "inputs cannot be computed; leave the lm_head in 16-bit (omit --lm-head-bits)."
            )
        return norm

    def untie_lm_head(self) -> bool:
        """Give the lm_head its own weight if it shares the input embedding's (tied embeddings), and
        record that in the config, so quantizing it leaves the embedding in 16-bit. True if it was tied."""
        _, head = self.lm_head()
        emb = self.model.get_input_embeddings()
        if getattr(emb, "weight", None) is None or head.weight.data_ptr() != emb.weight.data_ptr():
            return False
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        configs = {id(c): c for c in (self.model.config, self.model.config.get_text_config())}
        for cfg in configs.values():
            cfg.tie_word_embeddings = False
        logger.info("untied lm_head from the input embeddings (the embeddings stay in 16-bit)")
        return True

    def describe(self) -> str:
        prefix, layers = self.decoder_layers()
        return f"{type(self.model).__name__}: {len(layers)} decoder layers at {prefix}"


@register_adapter("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "llava_next", "llava_onevision",
                  "internvl", "gemma3", "mistral3", "glm4v", "glm4v_moe", "cohere2_vision", "exaone4_5")
class VLMAdapter(ModelAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and mixture-of-experts), LLaVA family, InternVL3, Gemma 3, Mistral 3,
    GLM-4.1V and GLM-4.5V (routed experts beside a shared one; its ``gate`` router stays 16-bit), Command A Vision,
    EXAONE 4.5:
    ``model.model.language_model`` (Qwen3-VL's deepstack features, added between decoder layers, are carried by
    the pipeline)."""


@register_adapter("qwen3_5", "qwen3_5_moe", "minicpmv4_6", "minicpmv4_7")
class Qwen3_5Adapter(ModelAdapter):
    """Qwen3.5 (dense and mixture-of-experts; natively multimodal) and MiniCPM-V 4.6 / 4.7 (a Qwen3.5 language model
    behind its own tower): hybrid decoder layers, Gated DeltaNet linear attention (``linear_attn.in_proj_qkv /
    in_proj_z / out_proj`` quantized) in three of every four, gated full attention in the fourth. Kept 16-bit: the
    MoE blocks' ``shared_expert_gate`` (one row; vLLM builds it without a quantization method) and DeltaNet's
    ``in_proj_b`` / ``in_proj_a`` (one row per value head, the inputs of the recurrence's write strength and decay,
    a thousandth of the layer's weights): vLLM fuses them into one ``in_proj_ba`` whose per-shard packed zero points
    only split on whole 32-bit words, which a few dozen rows at 3 bits do not fill."""

    kept_16bit = (r"(^|\.)linear_attn\.in_proj_[ab]$", r"(^|\.)mlp\.shared_expert_gate$")


@register_adapter("llama4")
class Llama4Adapter(ModelAdapter):
    """Llama 4 (Scout, Maverick): the text model is ``model.language_model.model``; its mixture-of-experts blocks
    (transposed experts, routing weight on the expert's input, a shared expert) are converted by
    :mod:`vlmptq.models.llama4`. Kept 16-bit: the ``router`` (an ``nn.Linear`` in transformers, vLLM builds it
    without a quantization method) and the attention's q/k/v projections: vLLM permutes the rows of q_proj and
    k_proj at load (to its rotary layout) together with their scales but not their packed zero points, so an
    asymmetric q/k would serve wrong; v_proj joins them in vLLM's fused qkv_proj (about 2% of a layer's weights).
    (The router is found and kept as every MoE router is.)"""

    kept_16bit = (r"(^|\.)self_attn\.[qkv]_proj$",)

    def text_model(self) -> nn.Module:
        return self.model.language_model.model

    @classmethod
    def prepare(cls, model: nn.Module) -> nn.Module:
        from vlmptq.models.llama4 import unfuse_llama4_moe

        unfuse_llama4_moe(cls(model).decoder_layers()[1])
        return super().prepare(model)


@register_adapter("gemma4")
class Gemma4Adapter(ModelAdapter):
    """Gemma 4: ``model.model.language_model``. Its decoder layers take a per-layer input (the per-layer embeddings)
    and the last ``num_kv_shared_layers`` reuse the keys and values of earlier layers (``shared_kv_states``, carried
    between layers by the pipeline per stream); full-attention layers with ``attention_k_eq_v`` have no v_proj.
    Kept 16-bit: the mixture-of-experts router's ``router.proj`` (vLLM builds it without a quantization method; the
    router module itself holds only scales, so it is not found as the other routers are)."""

    kept_16bit = (r"(^|\.)router\.proj$",)


@register_adapter("idefics3", "smolvlm")
class Idefics3Adapter(ModelAdapter):
    """Idefics3 / SmolVLM: the text model is ``model.model.text_model``."""

    text_attr = "text_model"


@register_adapter("llama", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "mistral")
class CausalLMAdapter(ModelAdapter):
    """Text-only causal LMs (every token is a text token): the quality benchmark's real models."""

    auto_class = "AutoModelForCausalLM"
    text_only = True

    def text_model(self) -> nn.Module:
        return self.model.model

    @classmethod
    def vision_token_ids_of(cls, config) -> set[int]:
        return set()


@register_adapter("gemma4_text")
class Gemma4TextAdapter(CausalLMAdapter):
    """Gemma 4's language model alone (``Gemma4ForCausalLM``): as :class:`Gemma4Adapter`, calibrated on text."""

    kept_16bit = Gemma4Adapter.kept_16bit


_LLAVA_ORIGINAL = (
    "the original LLaVA repository's format, which transformers' LLaVA classes do not load",
    "use the model's llava-hf conversion (e.g. llava-hf/llava-1.5-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf) "
    "or convert it with the script in transformers' repository, src/transformers/models/llava/"
    "convert_llava_weights_to_hf.py (llava_next/ and llava_onevision/ hold the later models' scripts)",
)
# Checkpoints in a model's original (remote-code) format, by the class config.json names: what they
# are and what to use instead.
ORIGINAL_FORMATS = {
    "InternVLChatModel": (
        "InternVL's original remote-code format (model_type internvl_chat), which transformers' InternVL "
        "classes do not load",
        "use the Hugging Face format of the same model (OpenGVLab/InternVL3-<size>-hf) or convert it with the "
        "script in transformers' repository, src/transformers/models/internvl/convert_internvl_weights_to_hf.py",
    ),
    "LlavaLlamaForCausalLM": _LLAVA_ORIGINAL,
    "LlavaMistralForCausalLM": _LLAVA_ORIGINAL,
    "LlavaQwenForCausalLM": _LLAVA_ORIGINAL,
}


def read_model_type(path: str | Path) -> str:
    """The config's ``model_type``; checkpoints in a known non-Hugging-Face format fail here with what to
    do instead."""
    import json

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise UnsupportedModelError(
            f"{path} has no config.json; --model must be a Hugging Face model folder (config.json, the weights "
            "and the processor files) or a Hub id"
        )
    try:
        config = json.loads(cfg.read_text())
        model_type = config["model_type"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UnsupportedModelError(f"{cfg} is not a valid model config ({e})") from e
    _check_not_quantized(path, config)
    for arch in config.get("architectures") or ():
        if arch in ORIGINAL_FORMATS:
            what, fix = ORIGINAL_FORMATS[arch]
            raise UnsupportedModelError(f"{path} is a {arch} checkpoint in {what}; {fix}")
    return model_type


def _check_not_quantized(path: str | Path, config: dict) -> None:
    """A source model must hold 16/32-bit weights: a quantized checkpoint (ours, AWQ, GPTQ, FP8, ...) would
    load with other modules (no ``weight``) or be quantized twice."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not qc:
        return
    method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
    fmt = qc.get("format") if isinstance(qc, dict) else None
    ours = isinstance(qc, dict) and "vlmptq" in qc
    raise UnsupportedModelError(
        f"{path} is already quantized (quantization_config: {method}{f', {fmt}' if fmt else ''}"
        f"{', written by vlmptq' if ours else ''}); --model must be a model with 16-bit weights: give the one it "
        "was made from (the original bf16 / fp16 release)"
    )


def check_loading_info(path: str | Path, info: dict, model: nn.Module | None = None) -> list[str]:
    """Refuse a model whose files lack weights its config calls for, or hold them in other shapes: transformers
    fills such weights with random values (a missing shard, a truncated conversion, another model's config.json)
    and the checkpoint written from them would be garbage that serves without complaint. Returns the tensors of the
    files the loaded ``model`` does not hold, by their names in the files (:func:`unbuilt_in_files`), which the output
    carries unchanged (:mod:`vlmptq.checkpoint.carried`); they are named in the log."""
    from vlmptq.checkpoint.config import summarize_names

    reported = set(info.get("unexpected_keys") or ()) | set(silently_dropped(path, model))
    carried = unbuilt_in_files(path, model) if model is not None else []
    if carried:  # e.g. Qwen3.5's, EXAONE 4.5's and GLM-4.5V's multi-token-prediction layers
        logger.info("%s: %d tensor(s) in its files are not part of the model transformers builds from its "
                    "config.json (%s); the output carries them unchanged, in 16 bit (a multi-token-prediction "
                    "layer among them can serve vLLM's MTP speculative decoding)", path, len(carried),
                    summarize_names(carried, 4))
    if len(reported) != len(carried):  # the load and our reading of its renamings disagree: say so, never drop
        logger.warning("%s: the load reports %d tensor(s) of its files as not part of the model (%s); %d of the "
                       "files' names do not map to the model's (%s), and only those are written to the output",
                       path, len(reported), summarize_names(sorted(reported), 4), len(carried),
                       summarize_names(carried, 4))
    missing, mismatched = list(info.get("missing_keys") or ()), list(info.get("mismatched_keys") or ())
    if not missing and not mismatched:
        return carried

    what = []
    if missing:
        what.append(f"{len(missing)} weight(s) missing from its files ({summarize_names(sorted(missing), 4)})")
    if mismatched:
        shapes = [f"{k} {tuple(a)} in the files, {tuple(b)} in config.json" for k, a, b in mismatched[:3]]
        what.append(f"{len(mismatched)} weight(s) in shapes its config.json does not describe ({'; '.join(shapes)}"
                    f"{' ...' if len(mismatched) > 3 else ''})")
    raise CheckpointError(
        f"{path} does not hold the model its config.json describes: {' and '.join(what)}. transformers would fill "
        "them with random values. Copy the missing shards (model.safetensors.index.json lists them), or use the "
        "config.json that came with these weights"
    )


def record_unbuilt(model: nn.Module, names: list[str]) -> None:
    """Mark ``model`` with the tensors of its files it does not hold, for the writer to carry
    (:data:`vlmptq.checkpoint.carried.UNBUILT`)."""
    from vlmptq.checkpoint.carried import UNBUILT

    setattr(model, UNBUILT, tuple(names))


def unbuilt_in_files(path: str | Path, model: nn.Module) -> list[str]:
    """The tensors of the safetensors files at ``path`` that ``model`` (as transformers builds it from the config,
    before :meth:`ModelAdapter.prepare`) would not hold, found as transformers' load finds them: each file name
    through the model's renamings and weight conversions, then looked up in its state dict. From the files'
    headers alone (``--dry-run`` sizes what the output carries with it); [] without safetensors files."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    keys = _file_keys(path)
    if not keys:
        return []
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    state = model.state_dict()
    return sorted(k for k in keys if k not in state and rename_source_key(
        k, renamings, converters, model.base_model_prefix, state)[0] not in state)


def silently_dropped(path: str | Path, model: nn.Module | None) -> list[str]:
    """Tensors of the checkpoint at ``path`` that ``model``'s class tells transformers to drop without reporting
    them (``_keys_to_ignore_on_load_unexpected``: GLM-4.5V's ``model.layers.46.*``, Qwen3.5's ``mtp.*``, Gemma 4's
    keys and values of its KV-shared layers); [] if it names none or the files cannot be listed (the load itself
    reports those)."""
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    if not patterns:
        return []
    return sorted(k for k in _file_keys(path) if any(re.search(p, k) for p in patterns))


def _file_keys(path: str | Path) -> set[str]:
    """The tensor names of the safetensors files at ``path``; empty if there are none (the load reports that)."""
    from vlmptq.checkpoint.reader import TensorStore

    try:
        return set(TensorStore(path, "model").keys())
    except CheckpointError:
        return set()


def read_checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json names (``dtype`` / ``torch_dtype``, also in
    ``text_config``), or None if it names none or cannot be read."""
    import json

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def adapter_for_type(model_type: str) -> type[ModelAdapter]:
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(sorted(ADAPTERS))}. "
            "Adding one is a few lines in vlmptq/models/adapters.py (where its decoder layers are)."
        )
    return ADAPTERS[model_type]


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, ModelAdapter]:
    """Load the checkpoint at ``path`` with its adapter (unknown architectures fail before loading)."""
    cls = adapter_for_type(read_model_type(path))
    model = cls.load(path, dtype)
    adapter = cls(model)
    logger.info("loaded %s", adapter.describe())
    return model, adapter


def load_model_lazily(path: str | Path, dtype: torch.dtype = torch.bfloat16, skeleton: nn.Module | None = None
                      ) -> tuple[nn.Module, ModelAdapter, "LazyLayers"]:
    """Load the checkpoint at ``path`` with its decoder layers left in the files until
    ``LazyLayers.load`` reads them (``vlmptq.models.lazy``). ``skeleton``: the model on the meta device
    (:func:`load_skeleton`), if the caller built it already."""
    import transformers

    from vlmptq.models.lazy import load_lazily

    cls = adapter_for_type(read_model_type(path))
    skeleton = skeleton if skeleton is not None else cls.skeleton(path, dtype)
    prefix, layers = cls(skeleton).decoder_layers()
    model, lazy = load_lazily(getattr(transformers, cls.auto_class), path, dtype, skeleton, prefix, len(layers))
    adapter = cls(cls.prepare(model))
    logger.info("loaded %s; its %d decoder layers are read one at a time", adapter.describe(), len(layers))
    return model, adapter, lazy


def load_skeleton(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, ModelAdapter]:
    """The model at ``path`` on the meta device (structure and shapes, no weights) with its adapter."""
    cls = adapter_for_type(read_model_type(path))
    model = cls.skeleton(path, dtype)
    return model, cls(model)


def load_processor(path: str | Path, text_only: bool = False):
    """The checkpoint's processor (tokenizer + image processor + chat template) for calibration; for a
    ``text_only`` model its tokenizer.

    Loaded before the weights, so a processor that cannot load fails in seconds; a missing optional
    package (SmolVLM's needs ``num2words``, some need ``torchvision``) is named with the fix."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return (AutoTokenizer if text_only else AutoProcessor).from_pretrained(str(path))
    except ImportError as e:
        raise UnsupportedModelError(
            f"the processor of {path} needs a package this environment lacks: {e} "
            "Install it (pip install <package>) and run again; nothing was loaded or written."
        ) from e
    except (OSError, ValueError, TypeError, KeyError) as e:
        if text_only:
            raise UnsupportedModelError(
                f"{path} has no usable tokenizer for calibration: {type(e).__name__}: {e}. Copy the tokenizer "
                "files of the original model (tokenizer.json, tokenizer_config.json, ...) into the folder."
            ) from e
        raise UnsupportedModelError(
            f"{path} has no usable processor (tokenizer, image processor, chat template) for image-text "
            f"calibration: {type(e).__name__}: {e}. Copy the processor files of the original model "
            "(preprocessor_config.json, tokenizer files, chat_template) into the folder."
        ) from e


def adapter_for_model(model: nn.Module) -> ModelAdapter:
    """The adapter for an already loaded model."""
    return adapter_for_type(model.config.model_type)(model)
