"""Reload: our checkpoints give the quantized model back, through our reader and through transformers.

Reference = the original tiny model with our dequantized weights written in (fake-quant). It must
give logits identical to (a) a fresh HF model loaded from a dense checkpoint made by
``dequantize_checkpoint`` (exercises the on-disk names) and (b) transformers' own compressed-tensors
loader reading our packed checkpoint (2/4/8 bit here: the venv's compressed-tensors 0.17 cannot read
dense 3-bit; that case runs against 0.20 in test_checkpoint_golden.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmptq.checkpoint.reader import inspect_checkpoint, read_quantization_config
from vlmptq.checkpoint.writer import save_quantized_checkpoint
from vlmptq.quant.scheme import WeightScheme

from tests.support.checkpoints import dense_copy, rtn_quantize_decoder

PROMPT = torch.tensor([[1, 15, 77, 300, 512, 1999, 42, 3, 9, 1200]])


def _fake_quant(src, quantized):
    model = AutoModelForImageTextToText.from_pretrained(src).eval()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, qw in quantized.items():
            mods[name].weight.copy_(qw.dequantize())
    return model


def _logits(model, **inputs):
    with torch.no_grad():
        return model(input_ids=PROMPT, **inputs).logits


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()


@pytest.mark.parametrize("scheme", [WeightScheme(3, 64, False), WeightScheme(2, 32, True)], ids=WeightScheme.describe)
def test_dequantized_checkpoint_reloads_to_identical_logits(model, tiny_qwen2_vl, tmp_path, scheme):
    quantized, ignore = rtn_quantize_decoder(model, scheme)
    ckpt = tmp_path / "q"
    save_quantized_checkpoint(model, quantized, ckpt, scheme=scheme, ignore=ignore, source_dir=tiny_qwen2_vl)
    ref = _fake_quant(tiny_qwen2_vl, quantized)
    fresh = AutoModelForImageTextToText.from_pretrained(dense_copy(ckpt, tmp_path / "dense")).eval()
    fresh_sd = fresh.state_dict()
    for k, v in ref.state_dict().items():  # every tensor, not only the quantized ones
        assert torch.equal(fresh_sd[k], v), k
    expected = _logits(ref)
    assert torch.equal(_logits(fresh), expected)
    assert not torch.equal(_logits(model), expected)  # quantization changed something


@pytest.mark.parametrize(
    "scheme", [WeightScheme(4, 32, False), WeightScheme(4, 64, True), WeightScheme(2, 64, False),
               WeightScheme(8, 32, True)], ids=WeightScheme.describe)
def test_transformers_loads_our_compressed_checkpoint(model, tiny_qwen2_vl, tmp_path, scheme):
    quantized, ignore = rtn_quantize_decoder(model, scheme)
    ckpt = tmp_path / "q"
    save_quantized_checkpoint(model, quantized, ckpt, scheme=scheme, ignore=ignore, source_dir=tiny_qwen2_vl)
    loaded = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    assert torch.equal(_logits(loaded), _logits(_fake_quant(tiny_qwen2_vl, quantized)))


def test_qwen2_5_vl_round_trip(tiny_qwen2_5_vl, tmp_path):
    """Qwen2.5-VL: gated vision MLP linears stay 16-bit under their on-disk names; HF reloads it."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_vl).eval()
    scheme = WeightScheme(4, 64, False)
    quantized, ignore = rtn_quantize_decoder(model, scheme)
    ckpt = tmp_path / "q"
    summary = save_quantized_checkpoint(model, quantized, ckpt, scheme=scheme, ignore=ignore,
                                        source_dir=tiny_qwen2_5_vl)
    assert summary.n_quantized == 14 and summary.n_ignored == len(ignore)
    pq = read_quantization_config(ckpt)
    assert "visual.blocks.0.mlp.gate_proj" in pq.ignore and "visual.merger.mlp.0" in pq.ignore
    assert "model.visual.blocks.0.mlp.gate_proj" in pq.ignore  # transformers-5 name for HF's loader
    report = inspect_checkpoint(ckpt)
    assert report.layers[0].name.startswith("model.layers.0.")
    assert set(report.ignore) == {n.removeprefix("model.") if n.startswith("model.visual.") else n for n in ignore}
    loaded = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    assert torch.equal(_logits(loaded), _logits(_fake_quant(tiny_qwen2_5_vl, quantized)))
