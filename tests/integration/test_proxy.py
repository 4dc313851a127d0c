"""The VLM proxy recipe on a tiny random language model (the real proxies use the same builder):
what it keeps from the language model, the vision-embedding scale, the on-disk layout vLLM reads,
quantization with vlmptq, loading in HF and in the vLLM-CPU engine."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


@pytest.fixture(scope="module")
def tiny_proxy(tmp_path_factory):
    from vlmptq.proxy import tiny_proxy_dir

    return tiny_proxy_dir(tmp_path_factory.mktemp("proxy") / "tiny-proxy", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def quantized(tiny_proxy, tmp_path_factory):
    from vlmptq import quantize
    from vlmptq.calib import CalibConfig
    from vlmptq.config import make_config

    out = tmp_path_factory.mktemp("q") / "w4"
    config = make_config(method="vlmptq", bits=4, group_size=64, device="cpu",
                         calib=CalibConfig(source="builtin", num_samples=3))
    report = quantize(tiny_proxy, out, config)
    assert len(report.records) == 14  # 2 layers x 7 decoder linears; nothing else
    return out


def test_proxy_keeps_the_language_model_and_matches_embedding_rms(tiny_proxy):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmptq.demo.evaluate import holdout_photo
    from vlmptq.proxy import _tiny_lm

    lm, _ = _tiny_lm()
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_proxy, dtype=torch.float32).eval()
    assert type(vlm).__name__ == "LlavaForConditionalGeneration"
    text = vlm.model.language_model
    for name, p in lm.model.layers.named_parameters():  # decoder weights unchanged (up to bf16)
        torch.testing.assert_close(text.layers.get_parameter(name), p.to(torch.bfloat16).float())
    n = lm.config.vocab_size
    torch.testing.assert_close(vlm.lm_head.weight[:n], lm.lm_head.weight.to(torch.bfloat16).float())

    proc = AutoProcessor.from_pretrained(tiny_proxy)
    pixels = proc.image_processor(images=[holdout_photo("chelsea")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = vlm.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                             vision_feature_select_strategy="default").pooler_output[0]
    ids = proc.tokenizer("A cup of espresso on a wooden table.", add_special_tokens=False).input_ids
    text_rms = text.embed_tokens.weight[ids].square().mean().sqrt()
    ratio = (feats.square().mean().sqrt() / text_rms).item()
    assert 0.5 < ratio < 2.0, ratio  # scaled on the calibration photos, checked on a held-out one


def test_proxy_checkpoint_uses_the_layout_vllm_reads(tiny_proxy):
    from safetensors import safe_open

    keys = list(safe_open(str(tiny_proxy / "model.safetensors"), "pt").keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)


def test_quantized_proxy_loads_in_hf_and_stays_close(tiny_proxy, quantized):
    from transformers import AutoProcessor

    from vlmptq.calib import BUILTIN_HOLDOUT
    from vlmptq.checkpoint.reader import read_quantization_config
    from vlmptq.demo.evaluate import EVAL_QUESTIONS, dequantize_into, kl_samples, mean_kl, reference_logprobs
    from vlmptq.models.adapters import load_model

    ignore = read_quantization_config(quantized).ignore
    assert any(i.startswith("vision_tower.vision_model.") for i in ignore)
    ref_model, adapter = load_model(tiny_proxy, torch.float32)
    samples = kl_samples(AutoProcessor.from_pretrained(tiny_proxy), adapter.vision_token_ids(),
                         BUILTIN_HOLDOUT[:1], EVAL_QUESTIONS[:2])
    ref = reference_logprobs(ref_model, samples)
    assert mean_kl(ref_model, samples, ref) == pytest.approx(0.0, abs=1e-6)
    kl = mean_kl(dequantize_into(ref_model, quantized), samples, ref)
    assert 0.0 < kl < 0.05, kl


def test_quantized_proxy_runs_in_vllm(quantized):
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from tests.support.quantized_checkpoint import layer_methods, vllm_engine
    from vlmptq.demo.evaluate import holdout_photo

    with vllm_engine(quantized, quantization="vlmptq", dtype="bfloat16") as llm:
        methods = layer_methods(llm)
        quant = {n for n, (cls, _) in methods.items() if "layers." in n and "vision" not in n}
        assert quant and all(methods[n][0] != "UnquantizedLinearMethod" for n in quant)
        assert all(cls == "UnquantizedLinearMethod" for n, (cls, _) in methods.items() if "vision" in n)
        prompt = "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": holdout_photo("coins")}},
                           SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0
