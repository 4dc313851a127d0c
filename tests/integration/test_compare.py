"""``vlmptq compare`` on tiny random Qwen2-VL checkpoints (real model classes, real processors, real
checkpoints written by the quantizer): the KL / top-1 figures order as the schemes' precision does,
an 8-bit checkpoint is all but identical to the source, and bad input fails before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.compare import compare, format_rows
from vlmptq.config import make_config
from vlmptq.demo.evaluate import dequantize_into
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.models.adapters import load_model

CALIB = CalibConfig(source="builtin", num_samples=3, max_seq_len=512)


@pytest.fixture(scope="module")
def checkpoints(tiny_qwen2_vl, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for name, fields in {"w8": dict(method="rtn", bits=8), "w4": dict(method="gptq", bits=4),
                         "w2": dict(method="rtn", bits=2)}.items():
        out[name] = root / name
        vlmptq.quantize(tiny_qwen2_vl, out[name], make_config(group_size=32, calib=CALIB, device="cpu", **fields))
    return out


def test_kl_and_agreement_follow_the_precision(tiny_qwen2_vl, checkpoints):
    rows = compare(tiny_qwen2_vl, [checkpoints["w8"], checkpoints["w4"], checkpoints["w2"]], photos=3, questions=1,
                   device="cpu")
    w8, w4, w2 = rows
    assert [r.method for r in rows] == ["rtn", "gptq", "rtn"]
    assert [r.scheme for r in rows] == ["W8 g32 asym", "W4 g32 asym", "W2 g32 asym"]
    assert w8.prompts == 3 and w8.positions == w4.positions == w2.positions > 3 * 10
    assert 0 <= w8.kl < w4.kl < w2.kl, rows
    # 8-bit: all but the source's own predictions (measured KL 3e-4, top-1 94%: a random model's next-token
    # distributions are nearly flat, so close runners-up swap places at the smallest perturbation)
    assert w8.kl < 1e-3 and w8.top1 > 0.9, w8
    assert w2.top1 < w8.top1
    table = format_rows(rows)
    assert table.count("\n") == 4 and "| W2 g32 asym |" in table


def test_own_pairs_and_the_cli(tiny_qwen2_vl, checkpoints, tmp_path, capsys):
    Image.new("RGB", (80, 60), (20, 120, 220)).save(tmp_path / "blue.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "blue.png", "text": "A blue rectangle.",
                                                      "prompt": "What colour is this?"}) + "\n")
    (row,) = compare(tiny_qwen2_vl, [checkpoints["w4"]], data=CalibConfig(source=str(tmp_path / "pairs.jsonl")),
                     device="cpu")
    assert row.prompts == 1 and row.positions > 5 and row.kl > 0

    from vlmptq.cli import main

    assert main(["compare", "--model", str(tiny_qwen2_vl), str(checkpoints["w4"]), "--photos", "1",
                 "--questions", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| checkpoint | method | scheme | KL vs source (nats/token) | top-1 agreement |" in out
    assert f"| {checkpoints['w4']} | gptq | W4 g32 asym |" in out


def test_bad_input_fails_before_loading(tiny_qwen2_vl, checkpoints, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"photos takes 1\.\.6 and questions 1\.\.4, got 7 and 1"):
        compare(tiny_qwen2_vl, [checkpoints["w4"]], photos=7, questions=1)
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        compare(tiny_qwen2_vl, [])
    with pytest.raises(ConfigError, match="device 'gpu' is not a torch device"):
        compare(tiny_qwen2_vl, [checkpoints["w4"]], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here"):
            compare(tiny_qwen2_vl, [checkpoints["w4"]], device="cuda")
    from vlmptq.cli import main

    assert main(["compare", "--model", str(tiny_qwen2_vl), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vlmptq: error:" in err and "config.json" in err and "Traceback" not in err


def test_checkpoint_of_another_model_is_named(tiny_qwen2_vl, tiny_qwen3_vl, checkpoints):
    model, _ = load_model(tiny_qwen3_vl, torch.float32)
    with pytest.raises(CheckpointError, match="is it a checkpoint of this model"):
        dequantize_into(model, checkpoints["w4"])


def test_a_quantized_tied_head_is_untied_not_written_into_the_embeddings(tiny_qwen2_vl_tied, tmp_path):
    out = tmp_path / "head8"
    vlmptq.quantize(tiny_qwen2_vl_tied, out, make_config(method="rtn", bits=4, group_size=32, lm_head_bits=8))
    model, _ = load_model(tiny_qwen2_vl_tied, torch.float32)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied to begin with
    dequantize_into(model, out)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    head = model.get_output_embeddings().weight
    assert not torch.equal(head, emb_before) and (head - emb_before).abs().max() < 0.05 * emb_before.abs().max()
