"""Writer behaviour (files, shards, atomicity, refusals) and reader errors on damaged checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from vlmptq.checkpoint.reader import dequantize_checkpoint, inspect_checkpoint, open_checkpoint
from vlmptq.checkpoint.writer import save_quantized_checkpoint
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.quant.grid import quantize_rtn
from vlmptq.quant.scheme import WeightScheme

from tests.support.checkpoints import rtn_quantize_decoder

SCHEME = WeightScheme(4, 32, False)


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()


@pytest.fixture(scope="module")
def quant(model):
    return rtn_quantize_decoder(model, SCHEME)


def _save(model, quant, out, **kw):
    quantized, ignore = quant
    kw.setdefault("scheme", SCHEME)
    kw.setdefault("ignore", ignore)
    return save_quantized_checkpoint(model, quantized, out, **kw)


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".vlmptq-" in p.name]


def test_files_config_and_summary(model, quant, tiny_qwen2_vl, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2_vl, src)
    # old weights, indexes and hidden files in the source must not travel
    (src / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (src / "model.safetensors.index.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"old")
    (src / ".cache").mkdir()
    (src / "preprocessor_config.json").write_text('{"x": 1}')
    out = tmp_path / "out"
    summary = _save(model, quant, out, source_dir=src, metadata={"method": "rtn", "calibration": {"samples": 0}})

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                            "preprocessor_config.json"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"] and cfg["dtype"] == "bfloat16"
    assert cfg["text_config"]["hidden_size"] == 192
    qc = cfg["quantization_config"]
    assert qc["vlmptq"]["method"] == "rtn" and qc["vlmptq"]["calibration"] == {"samples": 0}
    assert "visual.blocks.0.attn.qkv" in qc["ignore"] and "lm_head" in qc["ignore"]
    assert not any(i.startswith("model.layers.") for i in qc["ignore"])

    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight_packed" in tensors
    assert "model.layers.0.self_attn.q_proj.bias" in tensors  # bias kept
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert "visual.blocks.0.attn.qkv.weight" in tensors and "lm_head.weight" in tensors
    assert not any(k.startswith("model.language_model") or k.startswith("model.visual") for k in tensors)

    assert summary.n_quantized == 14 and summary.n_ignored == 11 and summary.n_shards == 1
    assert summary.bytes_total == sum(t.numel() * t.element_size() for t in tensors.values())
    assert summary.bits_per_weight == pytest.approx(4 + 20 / 32, abs=0.01)  # 4-bit codes + bf16 scale + 4-bit zero per 32
    assert summary.compression_ratio == pytest.approx(16 / summary.bits_per_weight)
    assert _leftovers(tmp_path) == []


def test_sub_config_dtypes_are_the_sources(model, quant, tiny_qwen2_vl, tmp_path):
    """transformers sets every sub-config's dtype to the one the model was loaded in; vLLM builds some towers from a
    sub-config as it stands (Gemma 4's vision tower ran in bfloat16 under --dtype float32, 0.036 in log-probability
    off), so they are written as the source has them; the top-level dtype is the weights'."""
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen2_vl, src)
    cfg = json.loads((src / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg["vision_config"].pop(key, None)
        cfg["text_config"].pop(key, None)
    cfg["text_config"]["torch_dtype"] = "float32"
    (src / "config.json").write_text(json.dumps(cfg))
    assert model.config.vision_config.dtype == torch.bfloat16  # what transformers would write
    _save(model, quant, tmp_path / "out", source_dir=src)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["dtype"] == "bfloat16" and "dtype" not in out["vision_config"]
    assert out["text_config"]["dtype"] == "float32"


def test_sharded_checkpoint_has_index_and_reads_back(model, quant, tmp_path):
    out = tmp_path / "out"
    summary = _save(model, quant, out, max_shard_size=600_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert summary.n_shards == len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == summary.bytes_total
    single = tmp_path / "single"
    _save(model, quant, single)
    a, b = dequantize_checkpoint(out), dequantize_checkpoint(single)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert set(index["weight_map"]) == set(load_file(str(single / "model.safetensors")))


def test_model_built_from_config_gets_the_same_disk_names(model, quant, tmp_path):
    """No from_pretrained (no _weight_conversions attached): transformers' default mapping applies."""
    fresh = type(model)._from_config(model.config).to(torch.bfloat16)
    fresh.load_state_dict(model.state_dict())
    _save(fresh, quant, tmp_path / "a")
    _save(model, quant, tmp_path / "b")
    assert set(load_file(str(tmp_path / "a" / "model.safetensors"))) == set(
        load_file(str(tmp_path / "b" / "model.safetensors")))


def test_refuses_non_empty_out_dir_and_leaves_it(model, quant, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="--overwrite") as e:
        _save(model, quant, out)
    assert "--out" in str(e.value)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_empty_out_dir_is_fine_and_overwrite_swaps(model, quant, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _save(model, quant, out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(CheckpointError, match="not empty"):
        _save(model, quant, out)
    _save(model, quant, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert open_checkpoint(out).config.scheme == SCHEME
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_out_dir_as_before(model, quant, tmp_path, monkeypatch, exc, existing):
    out = tmp_path / "out"
    if existing:
        _save(model, quant, out)
    before = _snapshot(out) if existing else None
    real = safetensors.torch.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise exc("disk full (simulated)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(exc):
        _save(model, quant, out, overwrite=True, max_shard_size=600_000)
    assert len(calls) == 2
    if existing:
        assert _snapshot(out) == before
    else:
        assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_refuses_source_dir_as_out_dir(model, quant, tiny_qwen2_vl):
    with pytest.raises(CheckpointError, match="source checkpoint"):
        _save(model, quant, tiny_qwen2_vl, source_dir=tiny_qwen2_vl, overwrite=True)


def test_linear_neither_quantized_nor_ignored(model, quant, tmp_path):
    quantized, ignore = quant
    with pytest.raises(ConfigError, match=r"neither quantized nor ignored: lm_head"):
        save_quantized_checkpoint(model, quantized, tmp_path / "o", scheme=SCHEME,
                                  ignore=[i for i in ignore if i != "lm_head"])
    assert not (tmp_path / "o").exists()


def test_modules_with_another_scheme_get_a_named_group(model, quant, tmp_path):
    """A decoder linear and the lm_head with schemes of their own: config groups name them, the
    reader gives each module its scheme back, and the lm_head is named even at the main scheme (vLLM's
    ParallelLMHead is not selected by the class target "Linear")."""
    quantized, ignore = dict(quant[0]), [i for i in quant[1] if i != "lm_head"]
    down = "model.language_model.layers.1.mlp.down_proj"
    quantized[down] = quantize_rtn(model.get_submodule(down).weight.data, WeightScheme(8, 64, True))
    quantized["lm_head"] = quantize_rtn(model.lm_head.weight.data, SCHEME)
    out = tmp_path / "o"
    summary = save_quantized_checkpoint(model, quantized, out, scheme=SCHEME, ignore=ignore)
    assert summary.scheme == "W4 g32 asym; lm_head W4 g32 asym; model.language_model.layers.1.mlp.down_proj W8 g64 sym"
    from vlmptq.checkpoint.reader import inspect_checkpoint

    # read back (on-disk names): the same modules, each counted once although the config names it twice
    assert inspect_checkpoint(out).scheme == \
        "W4 g32 asym; lm_head W4 g32 asym; model.layers.1.mlp.down_proj W8 g64 sym"
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["group_0"]["targets"] == ["Linear"]
    assert groups["group_1"]["targets"] == [r"re:^(.*\.)?lm_head$"]
    assert groups["group_2"]["weights"]["num_bits"] == 8
    assert r"re:^(.*\.)?model\.layers\.1\.mlp\.down_proj$" in groups["group_2"]["targets"]  # on-disk name
    ckpt = open_checkpoint(out)
    assert ckpt.config.scheme_for("model.layers.1.mlp.down_proj") == WeightScheme(8, 64, True)
    assert ckpt.config.scheme_for("model.layers.0.mlp.down_proj") == SCHEME
    dense = dequantize_checkpoint(out)
    torch.testing.assert_close(dense["model.layers.1.mlp.down_proj.weight"], quantized[down].dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(dense["lm_head.weight"], quantized["lm_head"].dequantize(), rtol=0, atol=0)
    assert "lm_head W4 g32 asym" in inspect_checkpoint(out).format()


def test_unknown_names(model, quant, tmp_path):
    quantized, ignore = quant
    with pytest.raises(ConfigError, match="'model.nope' is not in the model"):
        save_quantized_checkpoint(model, quantized, tmp_path / "o", scheme=SCHEME, ignore=ignore + ["model.nope"])
    with pytest.raises(ConfigError, match="only torch.nn.Linear"):
        q = dict(quantized)
        q["model.language_model.norm"] = next(iter(quantized.values()))
        save_quantized_checkpoint(model, q, tmp_path / "o", scheme=SCHEME, ignore=ignore)


def test_tied_weight_cannot_be_packed(tiny_qwen2_vl, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    emb = model.model.language_model.embed_tokens
    model.lm_head.weight = emb.weight  # tie
    quantized, ignore = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if name == "lm_head" or ".language_model.layers." in name:
                quantized[name] = quantize_rtn(mod.weight.data, WeightScheme(8, 32, True))
            else:
                ignore.append(name)
    with pytest.raises(CheckpointError, match="tied weights"):
        save_quantized_checkpoint(model, quantized, tmp_path / "o", scheme=WeightScheme(8, 32, True), ignore=ignore)


def test_weight_converter_on_quantized_tensor_is_refused(tiny_qwen2_vl, quant, tmp_path):
    """A (real) transformers WeightConverter that would reshape q/k/v on save must not touch packed codes."""
    from transformers.core_model_loading import Chunk, WeightConverter

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    conv = WeightConverter(
        source_patterns=["self_attn.qkv_proj.weight"],
        target_patterns=["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
        operations=[Chunk(dim=0)],
    )
    model._weight_conversions = list(model._weight_conversions) + [conv]
    with pytest.raises(CheckpointError, match="weight converter") as e:
        _save(model, quant, tmp_path / "o")
    assert "self_attn" in str(e.value) and "ignore" in str(e.value)
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


# --- reader: damaged checkpoints ---------------------------------------------------------------

@pytest.fixture(scope="module")
def good(model, quant, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "ckpt"
    _save(model, quant, out)
    return out


def _damaged(good, tmp_path, mutate):
    d = tmp_path / "bad"
    shutil.copytree(good, d)
    tensors = load_file(str(d / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


K = "model.layers.0.self_attn.k_proj"  # out 64, in 192; W4 g32 -> packed [64, 24], scale [64, 6], zp [8, 6]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t.pop(f"{K}.weight_zero_point"), f"'{K}.weight_zero_point' is missing; expected int32 [8, 6]"),
        (lambda t: t.pop(f"{K}.weight_packed"), f"'{K}.weight_packed' is missing; expected int32 [64, 24]"),
        (lambda t: t.update({f"{K}.weight_packed": t[f"{K}.weight_packed"][:, :20].contiguous()}),
         f"'{K}.weight_packed' is int32 [64, 20]; expected int32 [64, 24]"),
        (lambda t: t.update({f"{K}.weight_scale": t[f"{K}.weight_scale"][:32].contiguous()}),
         f"'{K}.weight_scale' is bfloat16 [32, 6]; expected float16/bfloat16/float32 [64, 6]"),
        (lambda t: t.update({f"{K}.weight_packed": t[f"{K}.weight_packed"].to(torch.int64)}),
         f"'{K}.weight_packed' is int64 [64, 24]; expected int32 [64, 24]"),
        (lambda t: t.update({f"{K}.weight_scale": t[f"{K}.weight_scale"].to(torch.int32)}),
         f"'{K}.weight_scale' is int32 [64, 6]; expected float16/bfloat16/float32 [64, 6]"),
    ],
)
def test_damaged_checkpoint_errors_name_tensor_and_expected_shape(good, tmp_path, mutate, expected):
    d = _damaged(good, tmp_path, mutate)
    for read in (dequantize_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError) as e:
            read(d)
        assert expected in str(e.value)


def _with_config(good, tmp_path, edit):
    d = tmp_path / "cfg"
    shutil.copytree(good, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("quantization_config"), "has no quantization_config"),
        (lambda c: c["quantization_config"].update(format="int-quantized")
         or c["quantization_config"]["config_groups"]["group_0"].update(format="int-quantized"),
         "format is 'int-quantized'"),
        (lambda c: c["quantization_config"].update(quant_method="awq"), "quant_method is 'awq'"),
        (lambda c: c["quantization_config"]["ignore"].append("model.layers.0.self_attn.k_proj"),
         "is in quantization_config.ignore but holds packed tensors"),
    ],
)
def test_bad_config_errors(good, tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        dequantize_checkpoint(_with_config(good, tmp_path, edit))


def test_missing_config_or_weights(good, tmp_path):
    d = tmp_path / "noconf"
    shutil.copytree(good, d)
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        inspect_checkpoint(d)
    shutil.copy2(good / "config.json", d / "config.json")
    with open(d / "model.safetensors", "r+b") as f:  # an interrupted copy
        f.truncate(os.path.getsize(d / "model.safetensors") - 1000)
    for read in (dequantize_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file \(.*file not "
                                                  r"fully covered\): the checkpoint is incomplete or corrupt"):
            read(d)
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        inspect_checkpoint(d)


def test_inspect_report(good):
    report = inspect_checkpoint(good)
    assert report.scheme == "W4 g32 asym" and report.layout == "dense"
    assert len(report.layers) == 14 and report.layers[0].name == "model.layers.0.mlp.down_proj"
    assert (report.layers[0].out_features, report.layers[0].in_features) == (192, 448)
    assert report.bits_per_weight == pytest.approx(4.625, abs=0.01)
    assert report.compression_ratio == pytest.approx(16 / report.bits_per_weight)
    assert "lm_head" in report.ignore and "model.visual.blocks.0.attn.qkv" in report.ignore_aliases
    assert report.bytes_by_part["zero points"] > 0 and report.bytes_by_part["16-bit tensors"] > 0
    text = str(report)
    for needle in ("W4 g32 asym", "model.layers.1.self_attn.q_proj", "192 x 192", "bits per weight",
                   "compression vs 16-bit", "lm_head", "vlmptq"):
        assert needle in text, needle
