"""An interrupted quantization keeps its finished decoder layers and ``--resume`` continues from them
(``vlmptq/pipeline/progress.py``): the checkpoint is bit-identical to an uninterrupted run's, finished
layers are not solved again, and a store from other settings or other calibration data is refused."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlmptq
import vlmptq.pipeline.sequential as sequential
from vlmptq.calib import CalibConfig
from vlmptq.config import make_config
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.pipeline.progress import progress_dir_for

CALIB = CalibConfig(source="builtin", num_samples=3, max_seq_len=512)


def _config(**overrides):
    fields = dict(method="vlmptq", bits=3, group_size=32, lm_head_bits=8, calib=CALIB, device="cpu")
    return make_config(**{**fields, **overrides})


class _Solves:
    """Counts the linears the pipeline solves; raises KeyboardInterrupt at the first one matching
    ``stop_at`` (the user's Ctrl-C, or a pre-empted job, in the middle of a layer)."""

    def __init__(self, monkeypatch, stop_at: str | None = None):
        self.names: list[str] = []
        original = sequential._solve_linear

        def solve(lin, full, *args, **kwargs):
            if stop_at is not None and stop_at in full:
                raise KeyboardInterrupt
            self.names.append(full)
            return original(lin, full, *args, **kwargs)

        monkeypatch.setattr(sequential, "_solve_linear", solve)


def _tensors(out):
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _interrupt_in_layer_1(src, out, monkeypatch, config):
    with monkeypatch.context() as m:
        solves = _Solves(m, stop_at="layers.1.")
        with pytest.raises(KeyboardInterrupt):
            vlmptq.quantize(src, out, config)
    assert solves.names and all(".layers.0." in n for n in solves.names)
    assert not out.exists()
    store = progress_dir_for(out)
    manifest = json.loads((store / "manifest.json").read_text())
    assert list(manifest["layers"]) == ["0"]
    return store


def test_resumed_run_writes_the_uninterrupted_checkpoint(tiny_qwen2_vl, tmp_path, monkeypatch, caplog):
    reference = tmp_path / "reference"
    vlmptq.quantize(tiny_qwen2_vl, reference, _config())
    assert not progress_dir_for(reference).exists()  # removed once the checkpoint is written

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="vlmptq.api"):
        store = _interrupt_in_layer_1(tiny_qwen2_vl, out, monkeypatch, _config())
    assert "--resume" in caplog.text and str(store) in caplog.text

    # Without --resume the earlier run's layers are neither used nor thrown away.
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(ConfigError, match=r"holds 1 finished decoder layer \(0\) .*pass --resume"):
        vlmptq.quantize(tiny_qwen2_vl, out, _config())
    assert sorted(p.name for p in store.iterdir()) == before and not out.exists()

    solves = _Solves(monkeypatch)
    report = vlmptq.quantize(tiny_qwen2_vl, out, _config(resume=True))
    assert all(".layers.0." not in n for n in solves.names)  # layer 0 came from the store
    assert len(solves.names) == 7 + 1  # layer 1's linears and the lm_head
    assert len(report.records) == 2 * 7 + 1
    assert not store.exists()

    ref, got = _tensors(reference), _tensors(out)
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ref_cfg = json.loads((reference / "config.json").read_text())
    got_cfg = json.loads((out / "config.json").read_text())
    assert got_cfg["quantization_config"] == ref_cfg["quantization_config"]  # mu per layer included


def test_resume_refuses_other_settings(tiny_qwen2_vl, tmp_path, monkeypatch):
    out = tmp_path / "out"
    store = _interrupt_in_layer_1(tiny_qwen2_vl, out, monkeypatch, _config(method="gptq", lm_head_bits=None))
    with pytest.raises(ConfigError, match=r"other settings \(settings\.bits: 3 then, 4 now\)"):
        vlmptq.quantize(tiny_qwen2_vl, out, _config(method="gptq", lm_head_bits=None, bits=4, resume=True))
    with pytest.raises(ConfigError, match=r"other settings \(settings\.bits: 3 then, 4 now\)\. Rerun with those "
                                          r"settings and --resume"):  # without --resume: the same facts
        vlmptq.quantize(tiny_qwen2_vl, out, _config(method="gptq", lm_head_bits=None, bits=4))
    assert (store / "manifest.json").exists() and not out.exists()
    # --resume with nothing stored simply starts from the first layer
    vlmptq.quantize(tiny_qwen2_vl, tmp_path / "fresh", _config(method="rtn", lm_head_bits=None, resume=True))


def test_resume_refuses_changed_calibration_data(tiny_qwen2_vl, tmp_path, monkeypatch):
    """Same options, but the calibration file changed in between: the inputs' digest differs."""
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"image": "red.png", "text": "a red square"}) + "\n")
    config = _config(method="gptq", lm_head_bits=None, calib=CalibConfig(source=str(data)))
    out = tmp_path / "out"
    _interrupt_in_layer_1(tiny_qwen2_vl, out, monkeypatch, config)
    data.write_text(json.dumps({"image": "red.png", "text": "a blue square"}) + "\n")
    with pytest.raises(ConfigError, match=r"calibration: .* then, .* now .*other calibration data"):
        vlmptq.quantize(tiny_qwen2_vl, out, config.model_copy(update={"resume": True}))


def test_damaged_store_is_named(tiny_qwen2_vl, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = _config(method="gptq", lm_head_bits=None)
    store = _interrupt_in_layer_1(tiny_qwen2_vl, out, monkeypatch, config)
    layer_file = store / "layer-00000.safetensors"
    layer_file.write_bytes(layer_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"layer-00000.safetensors \(decoder layer 0 .*cannot be read"):
        vlmptq.quantize(tiny_qwen2_vl, out, config.model_copy(update={"resume": True}))
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"not a readable vlmptq progress directory"):
        vlmptq.quantize(tiny_qwen2_vl, out, config.model_copy(update={"resume": True}))


def test_a_store_that_cannot_be_written_does_not_stop_the_run(tiny_qwen2_vl, tmp_path, caplog):
    out = tmp_path / "out"
    progress_dir_for(out).write_text("a file where the store would go")
    with caplog.at_level(logging.WARNING, logger="vlmptq.pipeline.progress"):
        report = vlmptq.quantize(tiny_qwen2_vl, out, _config(method="gptq", lm_head_bits=None))
    assert "could not save the progress of decoder layer 0" in caplog.text
    assert "cannot be resumed from here" in caplog.text
    assert report.checkpoint.n_quantized == 14
    assert progress_dir_for(out).read_text() == "a file where the store would go"  # not ours: left alone


def test_a_layer_file_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    """safetensors reports its I/O errors (a full disk) as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    import vlmptq.pipeline.progress as progress
    from vlmptq.quant.qweight import QuantizedWeight
    from vlmptq.quant.scheme import WeightScheme

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(progress, "save_file", full_disk)
    store = progress.LayerProgress(tmp_path / "store", {"x": 1})
    qw = QuantizedWeight(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.uint8),
                         WeightScheme(4, 32, False))
    with caplog.at_level(logging.WARNING, logger="vlmptq.pipeline.progress"):
        store.save(0, {"m.0.q": qw}, [])
        store.save(1, {"m.1.q": qw}, [])  # not attempted again after a failure
    assert caplog.text.count("could not save the progress") == 1 and "No space left" in caplog.text
    assert store.layers_done == [] and not list((tmp_path / "store").iterdir())  # no temp file left


def test_sigterm_unwinds_like_ctrl_c_and_the_cli_resumes(tiny_qwen2_vl, tmp_path, monkeypatch, capsys, caplog):
    """A pre-empted job gets SIGTERM: the CLI turns it into an interruption (exit 143), so the layers
    finished so far are kept and announced, --out stays absent, and --resume completes the run."""
    import os
    import signal

    from vlmptq.cli import main

    out = tmp_path / "out"
    argv = ["quantize", "--model", str(tiny_qwen2_vl), "--out", str(out), "--method", "gptq", "--bits", "3",
            "--group-size", "32", "--num-samples", "2", "--device", "cpu"]
    original = sequential._solve_linear

    def solve(lin, full, *args, **kwargs):
        if "layers.1." in full:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(lin, full, *args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(sequential, "_solve_linear", solve)
        with caplog.at_level(logging.WARNING, logger="vlmptq.api"):
            assert main(argv) == 143
    assert "vlmptq: terminated; nothing was written to --out" in capsys.readouterr().err
    assert "1 finished decoder layer (0) kept in" in caplog.text and "--resume" in caplog.text
    assert not out.exists() and (progress_dir_for(out) / "layer-00000.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler is gone again
    assert main([*argv, "--resume"]) == 0
    assert (out / "config.json").exists() and not progress_dir_for(out).exists()
