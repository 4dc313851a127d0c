"""Automatic mixed precision (``--target-bits``) end to end on a tiny Qwen2-VL: the sensitivity pass, the
allocation, the checkpoint it writes, what the plan shows, resume, and the errors found before any
weight is read."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import vlmptq
import vlmptq.allocation as allocation
import vlmptq.pipeline.sensitivity as sensitivity
from vlmptq.calib import CalibConfig
from vlmptq.checkpoint.reader import open_checkpoint
from vlmptq.config import make_config
from vlmptq.errors import ConfigError
from vlmptq.plan import plan
from tests.integration.test_resume import _interrupt_in_layer_1, _Solves, _tensors

CALIB = CalibConfig(source="builtin", num_samples=3, max_seq_len=512)
FUSED = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def _config(**fields):
    return make_config(**{**dict(method="gptq", target_bits=3, group_size=32, calib=CALIB, device="cpu"), **fields})


def _bits(out) -> dict[str, int]:
    ckpt = open_checkpoint(out)
    return {n: ckpt.quantized_weight(n).scheme.bits for n in ckpt.layers}


def _average(out, bits: dict[str, int]) -> float:
    ckpt = open_checkpoint(out)
    numel = {n: ckpt.quantized_weight(n).numel() for n in bits}
    return sum(bits[n] * numel[n] for n in bits) / sum(numel.values())


def test_target_bits_writes_a_fused_consistent_checkpoint_within_budget(tiny_qwen2_vl, tmp_path):
    out = tmp_path / "auto"
    report = vlmptq.quantize(tiny_qwen2_vl, out, _config())
    bits = _bits(out)
    assert len(bits) == 14 and set(bits.values()) <= {2, 3, 4} and len(set(bits.values())) > 1
    for li in (0, 1):  # vLLM fuses these: one scheme each
        for group in FUSED:
            assert len({b for n, b in bits.items() if f"layers.{li}." in n and n.rpartition(".")[2] in group}) == 1
    avg = _average(out, bits)
    assert 2.75 < avg <= 3.0  # within the budget, and most of it spent (units are coarse on a tiny model)
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["vlmptq"]
    assert meta["target_bits"] == 3 and meta["code_bits"] == pytest.approx(avg, abs=5e-4)
    assert meta["scheme"] == "auto W2/W3/W4 (target 3 bits)"
    assert len(report.records) == 14
    # the allocation is a function of the model and the calibration data: the same again
    _model, result, _n = vlmptq.quantize_in_memory(tiny_qwen2_vl, _config())
    assert {n.replace("language_model.", ""): qw.scheme.bits for n, qw in result.quantized.items()} == bits


def test_more_bits_buy_less_layer_change(tiny_qwen2_vl, monkeypatch):
    """The measured losses fall with the bits, and a higher target never leaves the summed loss higher."""
    seen = {}
    original = allocation.allocate_bits

    def spy(units, target, *args):
        seen[target] = (units, original(units, target, *args))
        return seen[target][1]

    monkeypatch.setattr(allocation, "allocate_bits", spy)
    for target in (2.5, 3.5):
        vlmptq.quantize_in_memory(tiny_qwen2_vl, _config(method="rtn", target_bits=target))
    units, low = seen[2.5]
    assert len(units) == 8  # 2 layers x (q/k/v, o, gate/up, down)
    assert all(u.losses[2] > u.losses[3] > u.losses[4] > 0 for u in units)
    high = seen[3.5][1]
    assert sum(u.losses[b] for u, b in zip(units, high)) < sum(u.losses[b] for u, b in zip(units, low))


def test_overrides_pin_linears_and_count_in_the_average(tiny_qwen2_vl, tmp_path):
    out = tmp_path / "pinned"
    config = _config(target_bits=3.5, overrides=[{"pattern": r"mlp\.down_proj$", "bits": 8}])
    vlmptq.quantize(tiny_qwen2_vl, out, config)
    bits = _bits(out)
    assert all(b == 8 for n, b in bits.items() if n.endswith("down_proj"))
    assert _average(out, bits) <= 3.5 and set(b for n, b in bits.items() if not n.endswith("down_proj")) <= {2, 3, 4}


def test_plan_shows_the_auto_share(tiny_qwen2_vl, tmp_path):
    p = plan(tiny_qwen2_vl, _config())
    assert [(s.scheme, s.linears) for s in p.shares] == [("auto W2/W3/W4 g32 asym", 14)]
    assert "chosen at run time by a sensitivity pass" in p.format()
    summary = vlmptq.quantize(tiny_qwen2_vl, tmp_path / "out", _config()).checkpoint
    # the plan assumes the budget is filled (here it is: 3.0 bits on average): bytes are affine in the bits
    assert _average(tmp_path / "out", _bits(tmp_path / "out")) == 3
    assert p.shares[0].nbytes == pytest.approx(summary.bytes_quantized_layers, rel=1e-3)


def test_resumed_run_takes_the_stored_allocation(tiny_qwen2_vl, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    vlmptq.quantize(tiny_qwen2_vl, reference, _config())
    out = tmp_path / "out"
    _interrupt_in_layer_1(tiny_qwen2_vl, out, monkeypatch, _config())
    monkeypatch.setattr(sensitivity, "measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    solves = _Solves(monkeypatch)
    vlmptq.quantize(tiny_qwen2_vl, out, _config(resume=True))
    assert solves.names and all(".layers.1." in n for n in solves.names)
    ref, got = _tensors(reference), _tensors(out)
    assert sorted(ref) == sorted(got) and all((ref[k] == got[k]).all() for k in ref)


@pytest.mark.parametrize("fields, match", [
    (dict(target_bits=2.2, bits_choices=(2, 4), overrides=[{"pattern": r"mlp\.", "bits": 4}]),
     r"--target-bits 2\.2 is below .*\(3\.\d+ code bits per weight"),
    (dict(target_bits=3, overrides=[{"pattern": "proj$", "bits": 4}]), "nothing left to allocate"),
    (dict(target_bits=3, ignore=["nothing_here"]), "--ignore 'nothing_here' matches no decoder linear"),
])
def test_unreachable_targets_are_refused_before_loading(tiny_qwen2_vl, tmp_path, no_weights, fields, match):
    with pytest.raises(ConfigError, match=match):
        vlmptq.quantize(tiny_qwen2_vl, tmp_path / "out", _config(**fields))
    assert not (tmp_path / "out").exists()


def test_cli_target_bits(tiny_qwen2_vl, tmp_path):
    run = subprocess.run([sys.executable, "-m", "vlmptq", "quantize", "--model", str(tiny_qwen2_vl), "--out",
                          str(tmp_path / "x"), "--target-bits", "2.5", "--bits", "3", "--dry-run"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "bits (--bits) and target_bits (--target-bits) exclude each other" in run.stderr
    run = subprocess.run([sys.executable, "-m", "vlmptq", "quantize", "--model", str(tiny_qwen2_vl), "--out",
                          str(tmp_path / "x"), "--target-bits", "3.5", "--bits-choices", "3", "4", "--group-size",
                          "32", "--dry-run"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert re.search(r"auto W3/W4 g32 asym\s+14", run.stdout)


def test_lazy_load_allocates_and_writes_the_same(tiny_qwen2_vl, tmp_path):
    """The pass reads each decoder layer from the files and puts it back; the quantizer then reads it again:
    the same allocation and checkpoint as with the whole model loaded."""
    vlmptq.quantize(tiny_qwen2_vl, tmp_path / "whole", _config(lazy_load=False))
    vlmptq.quantize(tiny_qwen2_vl, tmp_path / "lazy", _config(lazy_load=True))
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "lazy")
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
