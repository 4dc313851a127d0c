"""LLaVA, Idefics3 and InternVL checkpoints quantized by vlmptq serve through the plugin on the real
vLLM-CPU engine, and match the HF model (real transformers class) with the dequantized weights.

The same check as ``test_vllm_plugin.py``'s fp32 cases (tolerance and why there), per family: each
family has its own module names in vLLM (``language_model.model.layers``, ``vision_model``,
``multi_modal_projector``, ...), its own checkpoint layout and its own image processing, so the
checkpoint's ignore list, the plugin's per-layer decisions and the weight loading are exercised once
per layout. Tiny random models built from configs (``tests/support/tiny_families.py``).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.quantized_checkpoint import (
    build_quantized_checkpoint,
    dequantized_hf_model,
    generate,
    layer_methods,
    logprob_errors,
    pattern_image,
    vllm_engine,
)
from tests.support.tiny_families import build_tiny_family
from vlmptq.quant.scheme import WeightScheme

pytestmark = pytest.mark.slow
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

FP32_TOL = 1e-4  # as test_vllm_plugin.py: measured <= 8e-6 for these three


@pytest.mark.parametrize("family", ["llava", "idefics3", "internvl"])
def test_family_serves_through_the_plugin(family, tiny_qwen2_vl, tmp_path):
    from transformers import AutoProcessor

    src = build_tiny_family(family, tmp_path / family, tiny_qwen2_vl)
    ckpt = build_quantized_checkpoint(src, tmp_path / "w3", WeightScheme(3, 64, False))
    proc = AutoProcessor.from_pretrained(src)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    chat = proc.apply_chat_template(msgs, add_generation_prompt=True)
    with vllm_engine(ckpt.path, dtype="float32", quantization="vlmptq") as llm:
        methods = layer_methods(llm)
        outputs = generate(llm, [{"prompt": chat, "multi_modal_data": {"image": pattern_image()}}])
    ours = {n: k for n, (m, k) in methods.items() if m == "VlmptqLinearMethod"}
    assert len(ours) == 8 and set(ours.values()) == {"reference"}, ours  # 2 layers x qkv, o, gate_up, down
    assert all(".layers." in n for n in ours)
    others = {m for n, (m, _) in methods.items() if n not in ours}
    assert others <= {"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"}, others  # vision tower, projector
    hf_inputs = [dict(proc(text=[chat], images=[pattern_image()], return_tensors="pt"))]
    errs, margins = logprob_errors(dequantized_hf_model(src, ckpt, torch.float32), hf_inputs, outputs)
    assert max(errs) < FP32_TOL, f"max |dlogprob| {max(errs):.2e}"
    assert max(margins) < FP32_TOL
