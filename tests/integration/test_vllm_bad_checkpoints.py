"""Damaged or unsupported checkpoints fail while the real engine loads them, naming the tensor (or
config key) and what was expected. Tensor-parallel shard checks need TP > 1, which this machine
cannot run: ``tests/unit/test_plugin_validation.py`` calls the same check with those sizes."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.quantized_checkpoint import build_quantized_checkpoint, vllm_engine
from vlmptq.quant.scheme import WeightScheme

pytestmark = pytest.mark.slow
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
VLLM_Q = "language_model.model.layers.0.self_attn.q_proj"
VLLM_K = "language_model.model.layers.0.self_attn.k_proj"


@pytest.fixture(scope="module")
def w3_checkpoint(tiny_qwen2_vl, tmp_path_factory):
    return build_quantized_checkpoint(
        tiny_qwen2_vl, tmp_path_factory.mktemp("w3"), WeightScheme(3, 64, False)
    ).path


def damaged(src, tmp_path, tensors=None, config=None, full_config=None):
    out = tmp_path / "damaged"
    shutil.copytree(src, out)
    if tensors:
        sd = load_file(out / "model.safetensors")
        tensors(sd)
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    if config or full_config:
        cfg = json.loads((out / "config.json").read_text())
        if config:
            config(cfg["quantization_config"])
        if full_config:
            full_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def drop_column(sd):
    sd[f"{Q}.weight_packed"] = sd[f"{Q}.weight_packed"][:, :-1].contiguous()


def widen_dtype(sd):
    sd[f"{Q}.weight_packed"] = sd[f"{Q}.weight_packed"].to(torch.int64)


def weights(cfg):
    return cfg["config_groups"]["group_0"]["weights"]


def shorten_head_scale(sd):  # a head quantized for another vocabulary
    sd["lm_head.weight_scale"] = sd["lm_head.weight_scale"][:-64].contiguous()


CASES = {
    "missing-tensor": dict(
        tensors=lambda sd: sd.pop(f"{K}.weight_zero_point"),
        message=(
            rf"the checkpoint has no tensor\(s\) {VLLM_K}\.weight_zero_point\. "
            r"A W3 g64 asym linear needs"
        ),
    ),
    "wrong-packed-width": dict(
        tensors=drop_column,
        message=(
            rf"{VLLM_Q}\.weight_packed: shape \(192, 17\) does not match W3 g64 asym .* expected "
            r"\(192, 18\) \(dense\) or \(192, 20\) \(10 per word\)"
        ),
    ),
    "wrong-dtype": dict(
        tensors=widen_dtype,
        message=rf"{VLLM_Q}\.weight_packed: dtype torch\.int64, expected torch\.int32",
    ),
    "unsupported-bits": dict(
        config=lambda qc: weights(qc).update(num_bits=5),
        message=r"group_0\.weights: num_bits=5 is not supported by the vlmptq plugin",
    ),
    "group-size-not-dividing-a-layer": dict(
        config=lambda qc: weights(qc).update(group_size=96),  # divides 192, not down_proj's 448
        message=(
            r"layers\.0\.mlp\.down_proj: in_features=448 is not divisible by "
            r"group_size=96"
        ),
    ),
    "lm-head-missing-tensor": dict(
        head=True,
        tensors=lambda sd: sd.pop("lm_head.weight_zero_point"),
        message=r"the checkpoint has no tensor\(s\) language_model\.lm_head\.weight_zero_point\.",
    ),
    "lm-head-wrong-vocabulary": dict(
        head=True,
        tensors=shorten_head_scale,
        message=r"language_model\.lm_head\.weight_scale: shape \(1984, 3\) does not match",
    ),
    "lm-head-quantized-but-tied": dict(
        head=True,
        full_config=lambda cfg: cfg.update(tie_word_embeddings=True) or cfg["text_config"].update(
            tie_word_embeddings=True),
        message=r"language_model\.lm_head: the checkpoint quantizes the LM head .* ties it to the input embeddings",
    ),
}


@pytest.fixture(scope="module")
def w3_head_checkpoint(tiny_qwen2_vl, tmp_path_factory):
    """W3 g64 with the LM head quantized too (W3 g64)."""
    return build_quantized_checkpoint(
        tiny_qwen2_vl, tmp_path_factory.mktemp("w3-head"), WeightScheme(3, 64, False),
        head_scheme=WeightScheme(3, 64, False),
    ).path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_fails_at_load_naming_what_was_expected(request, tmp_path, case):
    spec = CASES[case]
    src = request.getfixturevalue("w3_head_checkpoint" if spec.get("head") else "w3_checkpoint")
    path = damaged(src, tmp_path, spec.get("tensors"), spec.get("config"), spec.get("full_config"))
    with pytest.raises(Exception) as e:
        with vllm_engine(path, quantization="vlmptq"):
            pass
    _assert_ours(e.value, spec["message"])


def _assert_ours(error: BaseException, message: str) -> None:
    chain, err = [], error
    while err is not None:  # vLLM may wrap the error; ours is somewhere in the chain
        chain.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    text = "\n".join(chain)
    assert re.search(message, text), text
    assert re.search(r"^(CheckpointError|ConfigError): ", text, re.M), (
        text
    )  # ours, not an assert deep in vLLM


def test_a_16_bit_model_served_with_our_method_says_to_quantize_it_first(tiny_qwen2_vl):
    """vLLM builds the config without arguments when config.json has no quantization_config: that was a
    TypeError about missing positional arguments."""
    with pytest.raises(Exception) as e:
        with vllm_engine(tiny_qwen2_vl, quantization="vlmptq"):
            pass
    _assert_ours(e.value, r"--quantization vlmptq serves quantized checkpoints, and this model's config\.json has no "
                          r"quantization_config: .* Quantize it first")
