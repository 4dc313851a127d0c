"""The quantizer end to end on tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (real transformers classes,
real processors, the built-in calibration photos), through the public API and the CLI."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForImageTextToText

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.checkpoint.reader import inspect_checkpoint
from vlmptq.config import make_config
from vlmptq.errors import CalibrationDataError, CheckpointError, ConfigError, UnsupportedModelError
from tests.support.checkpoints import dense_copy, image_prompt_inputs

CALIB = CalibConfig(source="builtin", num_samples=3, max_seq_len=512)

# A covering set: every method on both architectures and at W2/W3/W4 (rtn also W8), and every
# (group size, symmetry) combination on both architectures.
CASES = [
    ("qwen2_vl", "vlmptq", 2, 32, False),
    ("qwen2_vl", "gptaq", 3, 64, True),
    ("qwen2_vl", "gptq", 4, 32, True),
    ("qwen2_vl", "rtn", 2, 64, False),
    ("qwen2_vl", "vlmptq", 4, 64, False),
    ("qwen2_vl", "gptq", 3, 32, False),
    ("qwen2_vl", "rtn", 8, 32, False),
    ("qwen2_5_vl", "vlmptq", 3, 64, True),
    ("qwen2_5_vl", "gptaq", 4, 32, False),
    ("qwen2_5_vl", "gptq", 2, 64, True),
    ("qwen2_5_vl", "rtn", 3, 32, True),
    ("qwen2_5_vl", "gptaq", 2, 32, False),
    ("qwen2_5_vl", "rtn", 4, 64, False),
    ("qwen2_5_vl", "vlmptq", 2, 64, False),
    ("qwen3_vl", "vlmptq", 3, 64, False),  # deepstack (vision features added between decoder layers)
]


@pytest.fixture(scope="module")
def models(tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_qwen3_vl):
    return {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}


@pytest.mark.parametrize("arch,method,bits,group,sym", CASES, ids=lambda v: str(v))
def test_quantize_writes_a_checkpoint_that_reloads_to_the_fake_quant_model(models, tmp_path, arch, method, bits,
                                                                           group, sym):
    src = models[arch]
    config = make_config(method=method, bits=bits, group_size=group, symmetric=sym, calib=CALIB, device="cpu")
    model, result, n = vlmptq.quantize_in_memory(src, config)
    assert len(result.quantized) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert n == (0 if method == "rtn" else 3)
    for rec in result.records:
        if method != "rtn":
            assert rec.rel_error is not None and math.isfinite(rec.rel_error) and rec.rel_error < 0.5, rec
        if method == "vlmptq":
            assert rec.info["mu"] in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)

    from vlmptq.checkpoint.writer import save_quantized_checkpoint

    out = tmp_path / "ckpt"
    save_quantized_checkpoint(model, result.quantized, out, scheme=config.scheme, ignore=result.frozen,
                              source_dir=src, metadata={"method": method})
    report = inspect_checkpoint(out)
    assert report.scheme == config.scheme.describe()
    # Reload through our reader into a fresh model of the real class: identical weights, identical logits.
    fresh = AutoModelForImageTextToText.from_pretrained(dense_copy(out, tmp_path / "dense")).eval()
    fresh_sd = fresh.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_sd[k], v), k
    inputs = image_prompt_inputs(src)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_public_api_and_metadata(tiny_qwen2_5_vl, tmp_path):
    out = tmp_path / "q"
    config = make_config(method="vlmptq", bits=3, group_size=64, calib=CALIB, device="cpu")
    report = vlmptq.quantize(tiny_qwen2_5_vl, out, config)
    assert report.checkpoint.n_quantized == 14
    assert report.num_calibration_samples == 3
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    marker = qc["vlmptq"]
    assert marker["method"] == "vlmptq" and marker["calibration"]["num_samples"] == 3
    assert len(marker["mu"]) == 14
    assert any(n.startswith("visual.") for n in qc["ignore"]) and "lm_head" in qc["ignore"]
    for f in ("tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (out / f).exists(), f


def test_multi_image_calibration(tiny_qwen2_5_vl, tmp_path):
    """VLM-PTQ calibrated on samples of two images each (``"images"`` in a .jsonl): every vision token of both
    images counts in the vision statistics, so the modality-aware mu differs from calibrating on the first images
    alone."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (84, 56), "c.png": (70, 70), "d.png": (56, 56)}.items():
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / name)
    pairs = {"multi.jsonl": [["a.png", "b.png"], ["c.png", "d.png"]], "first.jsonl": [["a.png"], ["c.png"]]}
    mus = {}
    for name, images in pairs.items():
        (tmp_path / name).write_text("".join(json.dumps({"images": i, "text": "Photos."}) + "\n" for i in images))
        config = make_config(method="vlmptq", bits=3, group_size=64, device="cpu",
                             calib=CalibConfig(source=str(tmp_path / name), num_samples=2))
        _, result, n = vlmptq.quantize_in_memory(tiny_qwen2_5_vl, config)
        assert n == 2
        mus[name] = {r.name: r.info["mu"] for r in result.records}
    assert mus["multi.jsonl"] != mus["first.jsonl"]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_video_calibration(arch, request, tmp_path):
    """VLM-PTQ calibrated on video clips (folders of frames; one sample a clip after an image) through each Qwen-VL
    generation's processor and model: the video placeholders are vision tokens, the model's forward takes the
    clips' inputs as at inference."""
    from PIL import Image

    src = request.getfixturevalue(f"tiny_{arch}")
    gen = torch.Generator().manual_seed(0)
    for clip in ("c1", "c2"):
        (tmp_path / clip).mkdir()
        for i in range(6):
            pixels = torch.randint(0, 256, (56, 84, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / clip / f"{i:03d}.png")
    image = torch.randint(0, 256, (56, 56, 3), generator=gen, dtype=torch.uint8)
    Image.fromarray(image.numpy()).save(tmp_path / "a.png")
    records = [{"video": "c1", "text": "Noise flickers."}, {"image": "a.png", "video": "c2", "fps": 4, "text": "Both."}]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = make_config(method="vlmptq", bits=3, group_size=64, device="cpu",
                         calib=CalibConfig(source=str(tmp_path / "v.jsonl"), num_samples=2, video_frames=4))
    _, result, n = vlmptq.quantize_in_memory(src, config)
    assert n == 2 and result.records and all("mu" in r.info for r in result.records)


def test_solver_never_sees_the_vision_tower(tiny_qwen2_vl):
    config = make_config(method="gptq", bits=4, group_size=32, calib=CALIB, device="cpu",
                         ignore=(r"mlp\.down_proj",))
    _, result, _ = vlmptq.quantize_in_memory(tiny_qwen2_vl, config)
    assert all(".language_model.layers." in n for n in result.quantized)
    assert not any("down_proj" in n for n in result.quantized)
    assert sum("down_proj" in n for n in result.frozen) == 2



@pytest.mark.parametrize("pattern,left,kept", [(r"q_proj$", "self_attn.q_proj", "self_attn.k_proj"),
                                               (r"layers\.1\.mlp\.up_proj", "1.mlp.up_proj", "1.mlp.gate_proj")])
def test_ignore_that_splits_a_fused_group_is_refused(tiny_qwen2_vl, tmp_path, no_weights, pattern, left, kept):
    """vLLM fuses q/k/v and gate/up into one layer with one scheme: keeping part of one in 16-bit makes a
    checkpoint no vLLM can serve, so it is refused before the weights load, with a pattern that works."""
    config = make_config(method="gptq", bits=4, group_size=32, calib=CALIB, device="cpu", ignore=(pattern,))
    with pytest.raises(ConfigError, match=rf"--ignore keeps \S*{re.escape(left)} in 16-bit but not \S*"
                                          rf"{re.escape(kept)}.*one fused layer.*--ignore '"):
        vlmptq.quantize(tiny_qwen2_vl, tmp_path / "out", config)
    _untouched(tmp_path / "out", None)

@pytest.mark.parametrize("method,head_bits", [("vlmptq", 8), ("gptq", 3), ("rtn", 4)])
def test_lm_head_quantized_after_the_layers_and_untied(tiny_qwen2_vl_tied, tmp_path, method, head_bits):
    """--lm-head-bits: the head is solved last (its inputs: the final norm's outputs), untied from the
    embeddings (which keep their 16-bit values), written as its own config group, and the checkpoint
    reloads (tie_word_embeddings false) to exactly the fake-quant model."""
    src = tiny_qwen2_vl_tied
    config = make_config(method=method, bits=3, group_size=64, lm_head_bits=head_bits, calib=CALIB, device="cpu")
    before = AutoModelForImageTextToText.from_pretrained(src).eval()
    out = tmp_path / "q"
    report = vlmptq.quantize(src, out, config)
    assert report.records[-1].name == "lm_head" and report.checkpoint.n_quantized == 15
    if method != "rtn":
        assert 0 < report.records[-1].rel_error < 0.1
    qc = json.loads((out / "config.json").read_text())
    assert qc["tie_word_embeddings"] is False and qc["text_config"]["tie_word_embeddings"] is False
    quant = qc["quantization_config"]
    assert "lm_head" not in quant["ignore"] and quant["vlmptq"]["lm_head"] == f"W{head_bits} g64 asym"
    assert quant["config_groups"]["group_1"]["weights"]["num_bits"] == head_bits
    fresh = AutoModelForImageTextToText.from_pretrained(dense_copy(out, tmp_path / "dense")).eval()
    emb = fresh.get_input_embeddings().weight
    assert fresh.lm_head.weight.data_ptr() != emb.data_ptr()
    assert torch.equal(emb, before.get_input_embeddings().weight)  # the embeddings stay 16-bit
    head_err = (fresh.lm_head.weight.float() - before.lm_head.weight.float()).abs().max().item()
    assert 0 < head_err < 0.1
    model, _, _ = vlmptq.quantize_in_memory(src, config)
    inputs = image_prompt_inputs(src)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_lm_head_options_are_checked_before_any_work(tiny_qwen2_vl, tmp_path, no_weights):
    with pytest.raises(ConfigError, match="lm_head_group_size is set but lm_head_bits is not"):
        make_config(lm_head_group_size=64)
    with pytest.raises(ConfigError, match="lm_head_bits.*bits=5 is not supported"):
        make_config(lm_head_bits=5)
    out = tmp_path / "o"
    config = make_config(method="rtn", group_size=64, lm_head_bits=8, lm_head_group_size=128, device="cpu")
    with pytest.raises(ConfigError, match=r"lm_head has 192 input features, not divisible by the lm_head group "
                                          r"size 128.*--lm-head-group-size"):
        vlmptq.quantize(tiny_qwen2_vl, out, config)
    _untouched(out, None)


def test_mixed_precision_overrides(tiny_qwen2_vl, tmp_path):
    """--override: down_proj at W4 and layer 1's q/k/v at W8 g64 over a W2 g32 base. Each linear is
    solved and stored with its scheme, config.json names them in their own groups, and the
    checkpoint reloads to the in-memory fake-quant model."""
    from vlmptq.checkpoint.reader import open_checkpoint
    from vlmptq.config import SchemeOverride

    overrides = (SchemeOverride.parse(r"mlp\.down_proj$=4"),
                 SchemeOverride.parse(r"layers\.1\.self_attn\.(q|k|v)_proj$=8:64"))
    config = make_config(method="gptaq", bits=2, group_size=32, calib=CALIB, device="cpu", overrides=overrides)
    out = tmp_path / "mixed"
    report = vlmptq.quantize(tiny_qwen2_vl, out, config)
    assert report.checkpoint.n_quantized == 14
    ckpt = open_checkpoint(out)
    expect = {}
    for li in (0, 1):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            scheme = ("W4 g32 asym" if name == "mlp.down_proj" else
                      "W8 g64 asym" if li == 1 and name.startswith("self_attn.") and name != "self_attn.o_proj" else
                      "W2 g32 asym")
            expect[f"model.layers.{li}.{name}"] = scheme
    assert {n: ckpt.quantized_weight(n).scheme.describe() for n in ckpt.layers} == expect
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["num_bits"] for g in qc["config_groups"].values()] == [2, 4, 8]
    assert qc["vlmptq"]["overrides"] == [{"pattern": r"mlp\.down_proj$", "bits": 4},
                                         {"pattern": r"layers\.1\.self_attn\.(q|k|v)_proj$", "bits": 8,
                                          "group_size": 64}]
    # two modules (the config names each twice: on-disk and transformers-5 names), counted once each
    assert "W2 g32 asym; model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj W4 g32 asym" in \
        inspect_checkpoint(out).format()

    model, result, _ = vlmptq.quantize_in_memory(tiny_qwen2_vl, config)
    fresh = AutoModelForImageTextToText.from_pretrained(dense_copy(out, tmp_path / "dense")).eval()
    fresh_sd = fresh.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_sd[k], v), k
    # transformers' own compressed-tensors loader reads the packed mixed checkpoint (2/4/8 bit: the
    # venv's compressed-tensors 0.17 reads those) into the same model
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = image_prompt_inputs(tiny_qwen2_vl)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_override_that_splits_a_fused_group_is_refused(tiny_qwen2_vl, tmp_path, no_weights):
    from vlmptq.config import SchemeOverride

    config = make_config(method="rtn", bits=2, group_size=32, overrides=(SchemeOverride.parse(r"\.q_proj$=4"),))
    with pytest.raises(ConfigError, match=r"different schemes \(q_proj W4 g32 asym, k_proj W2 g32 asym, "
                                          r"v_proj W2 g32 asym\): vLLM serves q_proj / k_proj / v_proj as one"):
        vlmptq.quantize(tiny_qwen2_vl, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"overrides\[0\] \('down'\): group_size=48 is not supported"):
        make_config(overrides=({"pattern": "down", "bits": 4, "group_size": 48},))
    from vlmptq.cli import main

    assert main(["quantize", "--model", str(tiny_qwen2_vl), "--out", str(tmp_path / "o"), "--override", "down=x"]) == 2


# ------------------------------------------------------------------ bad input: clear error, nothing lost
def _untouched(out, before):
    if before is None:
        assert not out.exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in out.parent.iterdir() if "vlmptq-tmp" in p.name]


def test_group_size_the_layer_cannot_take(tiny_qwen2_vl, tmp_path, no_weights):
    out = tmp_path / "out"
    config = make_config(method="gptq", bits=4, group_size=128, calib=CALIB, device="cpu")
    with pytest.raises(ConfigError, match=r"has 192 input features, not divisible by group_size=128"):
        vlmptq.quantize(tiny_qwen2_vl, out, config)
    _untouched(out, None)


def test_unknown_architecture_lists_supported(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match=r"'bert' is not supported; supported model types: .*qwen2_5_vl"):
        vlmptq.quantize(src, tmp_path / "out")
    _untouched(tmp_path / "out", None)


@pytest.mark.parametrize("config,match", [
    ({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]},
     r"InternVLChatModel checkpoint in InternVL's original remote-code format .*InternVL3-<size>-hf\) or convert "
     r"it with .*convert_internvl_weights_to_hf\.py"),
    ({"model_type": "llava", "architectures": ["LlavaQwenForCausalLM"]},  # LLaVA-OneVision's own release
     r"LlavaQwenForCausalLM checkpoint in the original LLaVA repository's format.*llava-hf"),
])
def test_known_unsupported_formats_say_what_to_use_instead(tmp_path, config, match):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=match):
        vlmptq.quantize(src, tmp_path / "out")
    _untouched(tmp_path / "out", None)


def test_missing_or_truncated_weights_are_named_before_loading(tiny_qwen2_vl, tmp_path, no_weights):
    """A model folder without weights, or with a safetensors file cut short (an interrupted copy), failed inside
    transformers' loader with a bare OSError / SafetensorError; now it is named before loading (compare's source
    model: test_compare)."""
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_qwen2_vl, src)
    weights = src / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    config = make_config(method="rtn", group_size=32)
    match = r"model\.safetensors is not a readable safetensors file \(.*\): the model is incomplete or corrupt"
    with pytest.raises(CheckpointError, match=match):
        vlmptq.quantize(src, tmp_path / "out", config)
    weights.unlink()
    with pytest.raises(ConfigError, match=r"holds no weights \(model\.safetensors, its shards and index"):
        vlmptq.quantize(src, tmp_path / "out", config)
    _untouched(tmp_path / "out", None)


@pytest.mark.parametrize("lazy", [False, True])
def test_weights_the_config_does_not_describe_are_refused(tiny_qwen2_vl, tmp_path, lazy):
    """A weight missing from the files, or in another shape than config.json says, was filled with random values by
    transformers (a load report in the log, nothing more) and quantized into a checkpoint that serves garbage."""
    import shutil

    from safetensors.torch import load_file, save_file

    config = make_config(method="rtn", group_size=32, lazy_load=lazy)
    missing = tmp_path / "missing"
    shutil.copytree(tiny_qwen2_vl, missing)
    tensors = load_file(missing / "model.safetensors")
    gone = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))
    del tensors[gone]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not hold the model its config.json describes: 1 weight\(s\) "
                                              r"missing from its files \(\S*layers\.1\.mlp\.down_proj\.weight\)"):
        vlmptq.quantize(missing, tmp_path / "out", config)
    other = tmp_path / "other-config"
    shutil.copytree(tiny_qwen2_vl, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight (is )?\(448, 192\) in the (model's )?files, "
                                              r"(but its config.json describes|\(96, 192\) in config.json)"):
        vlmptq.quantize(other, tmp_path / "out", config)
    cfg["text_config"]["hidden_size"] = 100  # no model at all: 100 is not divisible by the heads
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"transformers cannot build the model \S+config\.json describes "
                                                    r"\(ValueError: hidden_size must be divisible"):
        vlmptq.quantize(other, tmp_path / "out", config)
    _untouched(tmp_path / "out", None)


@pytest.mark.parametrize("lazy", [False, True])
def test_tensors_the_model_does_not_use_are_carried(tiny_qwen2_vl, tmp_path, caplog, monkeypatch, lazy):
    """Tensors of the source files that transformers does not load go into the output as they are, their linears in
    ``ignore``, and a log line names them, where the run used to drop them (once without a word): ones the load
    reports, and ones the model class tells it to drop unreported (Qwen3.5's multi-token-prediction layers; here a
    pattern set on the tiny model's class). vLLM reads them from the output as from the source (``test_mtp.py``)."""
    import json
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "extra"
    shutil.copytree(tiny_qwen2_vl, src)
    tensors = load_file(src / "model.safetensors")
    extra = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight")).replace("layers.1.", "layers.2.")
    tensors[extra] = torch.randn(4, 4).to(torch.bfloat16)
    tensors["mtp.fc.weight"] = torch.randn(4, 8).to(torch.float16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    from transformers import Qwen2VLForConditionalGeneration

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "_keys_to_ignore_on_load_unexpected", [r"^mtp.*"],
                        raising=False)
    with caplog.at_level(logging.INFO, logger="vlmptq"):
        report = vlmptq.quantize(src, tmp_path / "out", make_config(method="rtn", group_size=32, lazy_load=lazy))
    assert re.search(r"2 tensor\(s\) in its files are not part of the model .* "
                     r"\(\S*layers\.2\.mlp\.down_proj\.weight, mtp\.fc\.weight\); the output carries them "
                     r"unchanged", caplog.text), caplog.text
    written = {k: t for f in (tmp_path / "out").glob("*.safetensors") for k, t in load_file(f).items()}
    assert all(written[k].dtype == tensors[k].dtype and torch.equal(written[k], tensors[k])
               for k in (extra, "mtp.fc.weight"))
    assert report.checkpoint.n_carried == 2 and "2 source tensors the model does not build" in str(report.checkpoint)
    ignore = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ignore"]
    assert {extra.removesuffix(".weight"), "mtp.fc"} <= set(ignore)


def test_model_folder_without_processor_files_fails_before_loading(tiny_qwen2_vl, tmp_path):
    """Weights and config but no tokenizer / preprocessor files: calibration cannot encode a sample,
    so the run stops before the weights load, says which files to copy, and writes nothing."""
    import shutil

    src = tmp_path / "weights-only"
    src.mkdir()
    for f in tiny_qwen2_vl.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, src / f.name)
    config = make_config(method="gptq", group_size=32, calib=CALIB, device="cpu")
    with pytest.raises(UnsupportedModelError, match=r"has no usable processor .*preprocessor_config.json"):
        vlmptq.quantize(src, tmp_path / "out", config)
    _untouched(tmp_path / "out", None)

def test_existing_output_is_refused_and_kept(tiny_qwen2_vl, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="--overwrite"):
        vlmptq.quantize(tiny_qwen2_vl, out, make_config(method="rtn", group_size=32))
    _untouched(out, ["keep.txt"])


def test_bad_calibration_fails_before_the_weights_load(tiny_qwen2_vl, tmp_path, no_weights):
    """The calibration set is encoded before any weight is read: a corrupt image (named), a source that does not
    exist, or a tokenizer that is not the model's costs seconds, not the load of a 72B model."""
    import shutil

    data = tmp_path / "calib.jsonl"
    (tmp_path / "broken.png").write_text("not an image")
    data.write_text(json.dumps({"image": "broken.png", "text": "a cat"}) + "\n")
    out = tmp_path / "out"
    config = make_config(method="vlmptq", group_size=32, calib=CalibConfig(source=str(data)), device="cpu")
    with pytest.raises(CalibrationDataError, match="broken.png"):
        vlmptq.quantize(tiny_qwen2_vl, out, config)
    config = make_config(method="gptq", group_size=32, calib=CalibConfig(source=str(tmp_path / "gone")), device="cpu")
    with pytest.raises(CalibrationDataError, match="'.*gone' does not exist; check the path"):
        vlmptq.quantize(tiny_qwen2_vl, out, config)
    small = tmp_path / "small-vocab"  # the same model with 64 embedding rows: the tokenizer's ids run past them
    shutil.copytree(tiny_qwen2_vl, small)
    cfg = json.loads((small / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    text_cfg["vocab_size"] = 64
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="input embeddings hold 64 rows: the tokenizer / processor files"):
        vlmptq.quantize(small, out, make_config(method="gptq", group_size=32, calib=CALIB, device="cpu"))
    _untouched(out, None)


def test_interrupted_run_leaves_no_output(tiny_qwen2_vl, tmp_path, monkeypatch):
    import vlmptq.solvers.methods as methods

    calls = {"n": 0}
    original = methods.gptq_quantize

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second decoder layer
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(methods, "gptq_quantize", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        vlmptq.quantize(tiny_qwen2_vl, out, make_config(method="gptq", group_size=32, calib=CALIB, device="cpu"))
    _untouched(out, None)


def test_invalid_options_name_the_field():
    with pytest.raises(ConfigError, match="bits"):
        make_config(bits=5)
    with pytest.raises(ConfigError, match="do not apply to method 'gptq'"):
        make_config(method="gptq", solver={"correction": "exact"})
    with pytest.raises(ConfigError, match="unknown method"):
        make_config(method="awq")
    with pytest.raises(ConfigError, match="Extra inputs are not permitted"):
        make_config(bitz=3)


def test_a_dict_config_is_validated_like_make_config(tiny_qwen2_vl, tmp_path):
    """quantize / plan take a dict of QuantizeConfig's fields (was: AttributeError 'dict' has no 'overwrite')."""
    from vlmptq.plan import plan

    report = vlmptq.quantize(tiny_qwen2_vl, tmp_path / "out", {"method": "rtn", "bits": 3, "group_size": 32})
    assert report.checkpoint.scheme == "W3 g32 asym"
    assert plan(tiny_qwen2_vl, {"method": "rtn", "group_size": 32}).shares
    with pytest.raises(ConfigError, match="bitz: Extra inputs are not permitted"):
        vlmptq.quantize(tiny_qwen2_vl, tmp_path / "o2", {"bitz": 3})
    with pytest.raises(ConfigError, match=r"config must be a QuantizeConfig \(vlmptq\.make_config\(.*not list"):
        vlmptq.quantize(tiny_qwen2_vl, tmp_path / "o2", ["rtn"])
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------ the CLI
def test_cli_version(capsys):
    from vlmptq import __version__
    from vlmptq.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vlmptq {__version__}"


def test_cli_quantize_and_inspect(tiny_qwen2_vl, tmp_path, capsys):
    from vlmptq.cli import main

    out = tmp_path / "cli-out"
    rc = main(["quantize", "--model", str(tiny_qwen2_vl), "--out", str(out), "--method", "gptq", "--bits", "3",
               "--group-size", "64", "--num-samples", "2", "--device", "cpu", "--lm-head-bits", "8",
               "--lm-head-group-size", "32", "--override", r"layers\.1\.mlp\.down_proj$=4", "--resume"])
    assert rc == 0
    assert "lm_head W8 g32 asym" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    for needle in ("W3 g64 asym; lm_head W8 g32 asym; ", "model.layers.1.mlp.down_proj W4 g64 asym", "compression",
                   "model.layers.0.self_attn.q_proj", "lm_head                             2048 x 192"):
        assert needle in report, needle


def test_cli_reports_bad_input_without_a_traceback(tiny_qwen2_vl, tmp_path, capsys):
    from vlmptq.cli import main

    rc = main(["quantize", "--model", str(tiny_qwen2_vl), "--out", str(tmp_path / "o"), "--group-size", "128",
               "--method", "rtn"])
    err = capsys.readouterr().err
    assert rc == 2 and "vlmptq: error:" in err and "Traceback" not in err
    assert "not divisible by group_size=128" in err
    assert not (tmp_path / "o").exists()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
