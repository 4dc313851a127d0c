"""LLaVA (1.5, NeXT, OneVision), Idefics3, SmolVLM, InternVL, Gemma 3, Mistral 3, GLM-4.1V, GLM-4.5V, Qwen3.5, Llama
4, Gemma 4, EXAONE 4.5 and MiniCPM-V 4.6 / 4.7 (tiny, random, real transformers classes and processors) quantize
through the same pipeline as Qwen2-VL and reload from their checkpoints to the same weights (GLM-4.5V's routed
experts: to the same logits; Llama 4, whose per-expert checkpoint transformers cannot load: its contents)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.config import make_config
from tests.support.checkpoints import dense_copy
from tests.support.tiny_families import build_tiny_family


# q, k, v, o, gate, up, down in each of 2 layers; GLM-4.1V stores gate_up as one linear; Gemma 4's 4 layers also have
# per_layer_input_gate and per_layer_projection, layer 1 (full attention, values = keys) no v_proj, layers 2-3
# (reading the keys and values of layers 0-1) only q_proj
# MiniCPM-V 4.6's Qwen3.5 layer 0 (DeltaNet: in_proj_qkv, in_proj_z, out_proj and the MLP; in_proj_b/a stay 16-bit)
QUANTIZED_LINEARS = {"glm4v": 12, "gemma4": 9 + 8 + 7 + 7, "minicpmv4_6": 6 + 7, "minicpmv4_7": 6 + 7}


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", "gemma3",
                                    "mistral3", "glm4v", "cohere2_vision", "gemma4", "exaone4_5", "minicpmv4_6",
                                    "minicpmv4_7"])
def test_family_quantizes_and_reloads(family, tiny_qwen2_vl, tmp_path):
    src = build_tiny_family(family, tmp_path / family, tiny_qwen2_vl)
    config = make_config(method="vlmptq", bits=3, group_size=64, calib=CalibConfig(num_samples=2), device="cpu")
    model, result, n = vlmptq.quantize_in_memory(src, config)
    assert n == 2 and len(result.quantized) == QUANTIZED_LINEARS.get(family, 14)
    assert all(".layers." in name for name in result.quantized)
    assert any("vision" in name or "visual" in name for name in result.frozen) and "lm_head" in result.frozen
    assert all("mu" in r.info for r in result.records)

    from vlmptq.checkpoint.writer import save_quantized_checkpoint

    out = tmp_path / "ckpt"
    save_quantized_checkpoint(model, result.quantized, out, scheme=config.scheme, ignore=result.frozen,
                              source_dir=src)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["ignore"]
    fresh = AutoModelForImageTextToText.from_pretrained(dense_copy(out, tmp_path / "dense")).eval()
    fresh_sd = fresh.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_sd[k], v), k


def _inputs_in_forward(model, inputs: dict, modules) -> list[torch.Tensor]:
    """The first argument each of ``modules`` receives in the model's own forward on ``inputs``, in call order."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone())) for m in modules]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_qwen3_vl_deepstack_features_reach_both_streams(tiny_qwen3_vl):
    """Qwen3-VL adds vision features to the hidden states after its first decoder layers (deepstack),
    outside the layers. The pipeline runs the layers itself, so it must add them too: every layer's
    input as the pipeline propagates it is what that layer receives in the model's own forward."""
    from vlmptq.models.adapters import load_model
    from vlmptq.pipeline.capture import advance
    from vlmptq.pipeline.sequential import _capture_streams
    from tests.support.checkpoints import image_prompt_inputs

    model, adapter = load_model(tiny_qwen3_vl, torch.bfloat16)
    _, layers = adapter.decoder_layers()
    norm = adapter.final_norm()
    inputs = image_prompt_inputs(tiny_qwen3_vl)
    truth = _inputs_in_forward(model, inputs, (*layers, norm))  # layer 0's, layer 1's, the final norm's
    image_rows = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    sample = SimpleNamespace(inputs=inputs, sample_id="photo", vision_mask=None, text_mask=None)
    cpu = torch.device("cpu")
    streams = _capture_streams(model, layers, norm, [sample], cpu, cpu, need_fp=True)
    for li in range(len(layers)):  # the tiny model's two vision blocks feed both decoder layers
        after = streams.calls[li][0].after
        assert after is not None and torch.equal(after.rows, image_rows), li
    assert torch.equal(streams.fp[0], truth[0])
    h, h_plain = streams.fp[0], streams.fp[0]
    with torch.no_grad():
        for li, layer in enumerate(layers):
            call = streams.calls[li][0]
            h = advance(layer, call, h, cpu)
            h_plain = advance(layer, SimpleNamespace(kwargs=call.kwargs, after=None), h_plain, cpu)
            # the features as the model adds them (the recorders return zeros, so they arrive unrounded)
            assert torch.equal(h, truth[li + 1]), li
            assert (h_plain.float() - truth[li + 1].float()).abs().max().item() > 1e-2  # the features matter


def test_gemma4_shared_keys_and_values_follow_each_stream(tiny_qwen2_vl, tmp_path):
    """Gemma 4's last layers attend with the keys and values of earlier layers, handed on in a mapping the text model
    passes to every layer (``shared_kv_states``), and its layers take their per-layer input by position. The pipeline
    runs the layers itself, on a quantized and a full-precision stream in turn: each stream's layers must read the
    keys and values its own earlier layers wrote. Checked against each model's own forward, with a perturbed copy
    standing in for the quantized layers, bit for bit; the streams sharing one mapping (the arguments as captured)
    gives the quantized stream the full-precision keys and values instead."""
    import copy

    from vlmptq.models.adapters import load_model
    from vlmptq.pipeline.capture import advance
    from vlmptq.pipeline.sequential import _capture_streams
    from tests.support.checkpoints import image_prompt_inputs

    src = build_tiny_family("gemma4", tmp_path / "gemma4", tiny_qwen2_vl)
    model, adapter = load_model(src, torch.float32)
    _, layers = adapter.decoder_layers()
    norm = adapter.final_norm()
    inputs = image_prompt_inputs(src)
    changed = copy.deepcopy(model)
    _, changed_layers = type(adapter)(changed).decoder_layers()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in changed_layers.parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    truth = _inputs_in_forward(model, inputs, (*layers, norm))
    truth_changed = _inputs_in_forward(changed, inputs, (*changed_layers, type(adapter)(changed).final_norm()))
    sample = SimpleNamespace(inputs=inputs, sample_id="photo", vision_mask=None, text_mask=None)
    cpu = torch.device("cpu")
    for own_state in (True, False):
        streams = _capture_streams(model, layers, norm, [sample], cpu, cpu, need_fp=True)
        assert "per_layer_input" in streams.calls[0][0].kwargs
        h, h_fp = streams.quant[0], streams.fp[0]
        with torch.no_grad():
            for li in range(len(layers)):
                h = advance(changed_layers[li], streams.call(li, 0), h, cpu)
                h_fp = advance(layers[li], streams.call(li, 0, fp=own_state), h_fp, cpu)
        assert torch.equal(h_fp, truth[-1])
        if own_state:
            assert torch.equal(h, truth_changed[-1])
        else:  # layers 2 and 3 read layers 0 and 1's full-precision keys and values
            assert (h - truth_changed[-1]).abs().max().item() > 1e-3


def test_glm4_5v_routed_and_shared_experts_quantize_and_reload(tiny_qwen2_vl, tmp_path):
    """GLM-4.5V: a dense first layer, then routed experts beside a shared expert. Every routed expert and the
    shared one are quantized (the shared one on every token), the router (with its correction bias) stays
    16-bit and is named in ``ignore``, and the checkpoint reloads into transformers' own classes as the
    fake-quant model: the same logits on an image prompt."""
    from safetensors.torch import load_file

    from vlmptq.checkpoint.writer import save_quantized_checkpoint
    from tests.support.checkpoints import image_prompt_inputs

    src = build_tiny_family("glm4v_moe", tmp_path / "glm4v_moe", tiny_qwen2_vl)
    config = make_config(method="vlmptq", bits=3, group_size=64, calib=CalibConfig(num_samples=2), device="cpu")
    model, result, _ = vlmptq.quantize_in_memory(src, config)
    layer1 = "model.language_model.layers.1.mlp"
    routed = {f"{layer1}.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    shared = {f"{layer1}.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert routed | shared <= set(result.quantized) and len(result.quantized) == 4 + 3 + 4 + 24 + 3
    assert f"{layer1}.gate" in result.frozen
    out = tmp_path / "ckpt"
    save_quantized_checkpoint(model, result.quantized, out, scheme=config.scheme, ignore=result.frozen, source_dir=src)
    keys = {k for f in out.glob("*.safetensors") for k in load_file(f)}
    assert {f"{layer1}.gate.weight", f"{layer1}.gate.e_score_correction_bias"} <= keys
    assert all(f"{m}.weight_packed" in keys for m in routed | shared)
    # transformers' eager expert loop, which ours follows to the bit (its default for GLM-4.5V, grouped_mm,
    # rounds differently in bf16)
    fresh = AutoModelForImageTextToText.from_pretrained(dense_copy(out, tmp_path / "dense"),
                                                        experts_implementation="eager").eval()
    inputs = image_prompt_inputs(src)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_llama4_experts_quantize_per_expert_and_the_router_and_qkv_stay_16bit(tiny_qwen2_vl, tmp_path):
    """Llama 4: the converted model is transformers' own (bf16 logits to the bit); every routed expert (calibrated
    on its routed tokens, one per token), the shared expert, o_proj and the dense layer's MLP are quantized; the
    router and q/k/v stay 16-bit, in ``ignore`` (vLLM permutes q/k rows at load but not packed zero points). The
    checkpoint writes the experts one by one, as vLLM reads them (served: test_vllm_families)."""
    from safetensors.torch import load_file

    from vlmptq.checkpoint.writer import save_quantized_checkpoint
    from vlmptq.models.adapters import load_model
    from tests.support.checkpoints import image_prompt_inputs

    src = build_tiny_family("llama4", tmp_path / "llama4", tiny_qwen2_vl)
    inputs = image_prompt_inputs(src)
    with torch.no_grad():
        want = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16)(**inputs).logits
        assert torch.equal(load_model(src, torch.bfloat16)[0](**inputs).logits, want)

    config = make_config(method="vlmptq", bits=3, group_size=64, calib=CalibConfig(num_samples=2), device="cpu")
    model, result, _ = vlmptq.quantize_in_memory(src, config)
    lm = "language_model.model.layers"
    routed = {f"{lm}.1.feed_forward.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    dense = {f"{lm}.{i}.{m}" for i, ms in ((0, ("feed_forward.gate_proj", "feed_forward.up_proj",
                                                 "feed_forward.down_proj")),
                                            (1, ("feed_forward.shared_expert.gate_proj",
                                                 "feed_forward.shared_expert.up_proj",
                                                 "feed_forward.shared_expert.down_proj"))) for m in ms}
    assert set(result.quantized) == routed | dense | {f"{lm}.0.self_attn.o_proj", f"{lm}.1.self_attn.o_proj"}
    kept = {f"{lm}.1.feed_forward.router"} | {f"{lm}.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"}
    assert kept <= set(result.frozen) and len(result.frozen) == len(set(result.frozen))
    tokens = [r.info["routed_tokens"] for r in result.records if r.name.endswith("gate_proj") and ".experts." in r.name]
    from vlmptq.calib import load_calibration
    from vlmptq.models.adapters import adapter_for_model, load_processor

    samples = load_calibration(config.calib, load_processor(src), sorted(adapter_for_model(model).vision_token_ids()))
    assert sum(tokens) == sum(s.inputs["input_ids"].numel() for s in samples)  # top-1: each token to one expert

    out = tmp_path / "ckpt"
    save_quantized_checkpoint(model, result.quantized, out, scheme=config.scheme, ignore=result.frozen, source_dir=src)
    keys = {k for f in out.glob("*.safetensors") for k in load_file(f)}
    assert all(f"{m}.weight_packed" in keys for m in routed | dense) and f"{lm}.1.feed_forward.router.weight" in keys
    assert not any("experts.gate_up_proj" in k for k in keys)
    assert kept <= set(json.loads((out / "config.json").read_text())["quantization_config"]["ignore"])


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_hybrid_layers_quantize_and_reload(arch, request, tmp_path):
    """Qwen3.5: three Gated DeltaNet layers, then a full attention layer. Each layer is run with the arguments
    the model gives that kind of layer (its own mask), so the pipeline's propagated inputs are the model's own;
    DeltaNet's in_proj_qkv / in_proj_z / out_proj are quantized, its in_proj_b / in_proj_a and the MoE's
    shared_expert_gate stay 16-bit and are named in ``ignore``; the checkpoint reloads to the same logits."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from vlmptq.checkpoint.writer import save_quantized_checkpoint
    from vlmptq.models.adapters import load_model
    from vlmptq.pipeline.capture import advance
    from vlmptq.pipeline.sequential import _capture_streams
    from tests.support.checkpoints import image_prompt_inputs

    src = request.getfixturevalue(f"tiny_{arch}")
    inputs = image_prompt_inputs(src)
    model, adapter = load_model(src, torch.float32)
    _, layers = adapter.decoder_layers()
    truth = _inputs_in_forward(model, inputs, (*layers, adapter.final_norm()))
    sample = SimpleNamespace(inputs=inputs, sample_id="photo", vision_mask=None, text_mask=None)
    cpu = torch.device("cpu")
    streams = _capture_streams(model, layers, adapter.final_norm(), [sample], cpu, cpu, need_fp=False)
    h = streams.quant[0]
    with torch.no_grad():
        for li, layer in enumerate(layers):
            h = advance(layer, streams.calls[li][0], h, cpu)
            assert torch.equal(h, truth[li + 1]), li

    config = make_config(method="vlmptq", bits=3, group_size=64, calib=CalibConfig(num_samples=2), device="cpu")
    model, result, _ = vlmptq.quantize_in_memory(src, config)
    prefix = "model.language_model.layers"
    mlp = 3 * 8 + 3 if arch == "qwen3_5_moe" else 3  # routed experts and the shared one, or gate/up/down
    assert len(result.quantized) == 3 * (3 + mlp) + (4 + mlp)
    kept = {f"{prefix}.{li}.linear_attn.in_proj_{p}" for li in range(3) for p in "ab"}
    if arch == "qwen3_5_moe":
        kept |= {f"{prefix}.{li}.mlp.{m}" for li in range(4) for m in ("shared_expert_gate", "gate")}
    assert kept <= set(result.frozen) and not kept & set(result.quantized)
    assert {f"{prefix}.0.linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "out_proj")} <= set(result.quantized)
    out = tmp_path / "ckpt"
    save_quantized_checkpoint(model, result.quantized, out, scheme=config.scheme, ignore=result.frozen, source_dir=src)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert kept <= set(qc["ignore"])
    keys = {k for f in out.glob("*.safetensors") for k in load_file(f)}
    assert {f"{k}.weight" for k in kept} <= keys
    fresh = AutoModelForImageTextToText.from_pretrained(dense_copy(out, tmp_path / "dense"),
                                                        experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "idefics3", "internvl", "gemma3", "mistral3",
                                    "glm4v", "llama4", "cohere2_vision", "gemma4", "exaone4_5", "minicpmv4_6"])
def test_two_image_samples_run_through_each_family(family, tiny_qwen2_vl, tmp_path):
    """A multi-image calibration sample goes through each family's own processor (one image block per image, the
    images as one nested list) and its model's forward, which checks that the image features fill the placeholders.
    Each image keeps the tokens it has alone, but in LLaVA-OneVision, whose processor shows several images of one
    sample at base resolution only (no anyres tiles: its multi-image convention)."""
    from PIL import Image

    from vlmptq.calib.encode import encode_record
    from vlmptq.calib.records import Record
    from vlmptq.models.adapters import load_model, load_processor

    src = build_tiny_family(family, tmp_path / family, tiny_qwen2_vl)
    model, adapter = load_model(src, torch.bfloat16)
    processor, ids = load_processor(src), torch.tensor(sorted(adapter.vision_token_ids()))
    gen = torch.Generator().manual_seed(0)
    a, b = (Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for h, w in ((60, 80), (90, 70)))

    def vision_tokens(*images):
        sample = encode_record(Record("x", images, "A caption.", None), processor, ids, CalibConfig())
        return sample, int(sample.vision_mask.sum())

    both, n = vision_tokens(a, b)
    with torch.no_grad():
        model(**both.inputs)
    alone = vision_tokens(a)[1] + vision_tokens(b)[1]
    assert (n < alone) if family == "llava_onevision" else (n == alone), (n, alone)


def test_video_samples_in_llava_onevision_and_a_layout_not_taken(tiny_qwen2_vl, tmp_path):
    """A clip goes through LLaVA-OneVision's processor (frames [videos, frames, 3, H, W], pooled per frame) and its
    model's forward; Gemma 4's processor lays clips out otherwise (its model in transformers 5.19 does not take the
    frame counts the processor returns) and is refused at encoding, before any weight is read."""
    from PIL import Image

    from vlmptq.calib.encode import encode_record
    from vlmptq.calib.video import Video
    from vlmptq.calib.records import Record
    from vlmptq.errors import ConfigError
    from vlmptq.models.adapters import load_model, load_processor

    gen = torch.Generator().manual_seed(0)
    frames = tuple(Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=gen, dtype=torch.uint8).numpy())
                   for _ in range(8))
    record = Record("clip", (), "Noise flickers.", None, videos=(Video(frames, 2.0),))
    src = build_tiny_family("llava_onevision", tmp_path / "ov", tiny_qwen2_vl)
    model, adapter = load_model(src, torch.bfloat16)
    ids = torch.tensor(sorted(adapter.vision_token_ids()))
    sample = encode_record(record, load_processor(src), ids, CalibConfig())
    assert sample.inputs["pixel_values_videos"].shape[:2] == (1, 8) and int(sample.vision_mask.sum()) > 8
    with torch.no_grad():
        model(**sample.inputs)
    src = build_tiny_family("gemma4", tmp_path / "g4", tiny_qwen2_vl)
    with pytest.raises(ConfigError, match=r"Gemma4Processor\) lays videos out in a way vlmptq has not tested"):
        encode_record(record, load_processor(src), ids, CalibConfig())
