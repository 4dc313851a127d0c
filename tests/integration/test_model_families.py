"""LLaVA, Idefics3 and InternVL (tiny, random, real transformers classes and processors) quantize
through the same pipeline as Qwen2-VL and reload from their checkpoints to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.config import make_config
from tests.support.checkpoints import dense_copy
from tests.support.tiny_families import build_tiny_family


@pytest.mark.parametrize("family", ["llava", "idefics3", "internvl"])
def test_family_quantizes_and_reloads(family, tiny_qwen2_vl, tmp_path):
    src = build_tiny_family(family, tmp_path / family, tiny_qwen2_vl)
    config = make_config(method="vlmptq", bits=3, group_size=64, calib=CalibConfig(num_samples=2), device="cpu")
    model, result, n = vlmptq.quantize_in_memory(src, config)
    assert n == 2 and len(result.quantized) == 14
    assert all(".layers." in name for name in result.quantized)
    assert any("vision" in name for name in result.frozen) and "lm_head" in result.frozen
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
