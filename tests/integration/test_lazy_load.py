"""``--lazy-load`` (``vlmptq/models/lazy.py``): the decoder layers are read from the checkpoint files as the
pipeline reaches them, and their quantized weights dropped once done. The checkpoint must be the one a
whole-model run writes, bit for bit, on every supported family (their on-disk names differ: LLaVA's and
Gemma 3's vision towers, Qwen2-VL's pre-transformers-5 layout), with deepstack features, --ignore,
a W8 head and --resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.config import make_config
from vlmptq.models.adapters import load_model_lazily
from tests.support.interrupt import interrupt_in_layer
from tests.support.tiny_families import build_tiny_family

CALIB = CalibConfig(source="builtin", num_samples=2, max_seq_len=512)


def _config(**fields):
    return make_config(**{**dict(method="vlmptq", bits=3, group_size=32, device="cpu", calib=CALIB), **fields})


def _tensors(out):
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    qa, qb = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (a, b))
    assert qa == qb


def _legacy_qwen2_vl(src, dst):
    """The same checkpoint in Qwen2-VL's published layout (``model.layers.*``, ``visual.*``), which
    transformers 5 renames while loading."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            sd = load_file(f)
            sd = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                  for k, v in sd.items()}
            assert any(k.startswith("model.layers.") for k in sd)
            save_file(sd, dst / f.name, metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_vl_legacy_names", "qwen2_5_vl", "qwen3_vl", "llava",
                                    "llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", "gemma3",
                                    "mistral3", "llama4", "cohere2_vision", "gemma4", "gemma4_moe",
                                    "exaone4_5", "minicpmv4_6", "minicpmv4_7"])
def test_lazy_run_writes_the_whole_model_runs_checkpoint(family, tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_qwen3_vl,
                                                         tmp_path):
    if family == "qwen2_vl":
        src = tiny_qwen2_vl
    elif family == "qwen2_5_vl":
        src = tiny_qwen2_5_vl
    elif family == "qwen2_vl_legacy_names":
        src = _legacy_qwen2_vl(tiny_qwen2_vl, tmp_path / "legacy")
    elif family == "qwen3_vl":  # deepstack: features added between decoder layers
        src = tiny_qwen3_vl
    else:
        src = build_tiny_family(family, tmp_path / family, tiny_qwen2_vl)
    vlmptq.quantize(src, tmp_path / "whole", _config())
    vlmptq.quantize(src, tmp_path / "lazy", _config(lazy_load=True))
    _same_checkpoint(tmp_path / "whole", tmp_path / "lazy")


def test_lazy_run_with_ignore_head_and_resume(tiny_qwen2_vl, tmp_path, monkeypatch):
    fields = dict(ignore=(r"mlp\.down_proj",), lm_head_bits=8)
    vlmptq.quantize(tiny_qwen2_vl, tmp_path / "whole", _config(**fields))

    interrupt_in_layer(monkeypatch, lambda: vlmptq.quantize(tiny_qwen2_vl, tmp_path / "lazy",
                                                            _config(lazy_load=True, **fields)))
    vlmptq.quantize(tiny_qwen2_vl, tmp_path / "lazy", _config(lazy_load=True, resume=True, **fields))
    _same_checkpoint(tmp_path / "whole", tmp_path / "lazy")
    assert any(k.endswith("layers.0.mlp.down_proj.weight") for k in _tensors(tmp_path / "lazy"))  # kept 16-bit


def test_what_a_lazy_run_keeps_in_memory(tiny_qwen2_vl):
    """quantize() drops each quantized linear's weight once its layer is done (the codes are kept);
    quantize_in_memory returns the whole fake-quant model unless told otherwise."""
    whole, res_whole, _ = vlmptq.quantize_in_memory(tiny_qwen2_vl, _config())
    kept, res_kept, _ = vlmptq.quantize_in_memory(tiny_qwen2_vl, _config(lazy_load=True))
    a, b = whole.state_dict(), kept.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    lean, res_lean, _ = vlmptq.quantize_in_memory(tiny_qwen2_vl, _config(lazy_load=True), keep_model=False)
    for name, p in lean.named_parameters():
        quantized_weight = name.endswith(".weight") and name[: -len(".weight")] in res_lean.quantized
        assert (p.device.type == "meta") == quantized_weight, name
    assert sorted(res_lean.quantized) == sorted(res_whole.quantized)
    for name, qw in res_lean.quantized.items():
        assert torch.equal(qw.codes, res_whole.quantized[name].codes), name


def test_layer_device_map_covers_every_tensor_once(tiny_qwen3_vl):
    from vlmptq.models.adapters import load_skeleton
    from vlmptq.models.lazy import layer_device_map

    skeleton, adapter = load_skeleton(tiny_qwen3_vl)
    prefix, layers = adapter.decoder_layers()
    device_map = layer_device_map(skeleton, prefix, len(layers))
    assert [k for k, v in device_map.items() if v == "disk"] == [f"{prefix}.{i}" for i in range(len(layers))]
    for name, _ in [*skeleton.named_parameters(), *skeleton.named_buffers()]:
        owners = [k for k in device_map if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)


def test_lazy_text_only_model(tiny_qwen2_vl, tmp_path):
    """A text-only model (AutoModelForCausalLM, decoder layers at model.layers), RTN: no calibration."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=2048, tie_word_embeddings=False)
    src = tmp_path / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_qwen2_vl).save_pretrained(src)
    vlmptq.quantize(src, tmp_path / "whole", _config(method="rtn"))
    vlmptq.quantize(src, tmp_path / "lazy", _config(method="rtn", lazy_load=True))
    _same_checkpoint(tmp_path / "whole", tmp_path / "lazy")


def test_a_model_too_big_for_the_host_memory_is_loaded_lazily(tiny_qwen2_vl, monkeypatch, caplog):
    """By default (lazy_load=None) the decoder layers are read lazily when the weights would not fit;
    forced whole, the run says that it may not fit."""
    import logging
    from types import SimpleNamespace

    import psutil

    import vlmptq.api as api

    loaded = []
    monkeypatch.setattr(api, "load_model_lazily", lambda *a: loaded.append(a) or load_model_lazily(*a))
    with caplog.at_level(logging.WARNING, logger="vlmptq.models.lazy"):
        vlmptq.quantize_in_memory(tiny_qwen2_vl, _config(method="rtn"))  # plenty of memory: whole
        assert not loaded and not caplog.text
        monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
        vlmptq.quantize_in_memory(tiny_qwen2_vl, _config(method="rtn"))
        assert len(loaded) == 1 and "reading its decoder layers one at a time (--lazy-load" in caplog.text
        caplog.clear()
        vlmptq.quantize_in_memory(tiny_qwen2_vl, _config(method="rtn", lazy_load=False))
        assert len(loaded) == 1 and "loading the whole model may swap or fail; --lazy-load" in caplog.text


def test_lazy_load_of_a_checkpoint_without_safetensors(tiny_qwen2_vl, tmp_path, caplog):
    """pytorch_model.bin: transformers re-saves the offloaded layers to a temporary folder; same result."""
    import logging
    import shutil

    src = tmp_path / "bin"
    shutil.copytree(tiny_qwen2_vl, src)
    sd = {}
    for f in src.glob("*.safetensors"):
        sd.update(load_file(f))
        f.unlink()
    torch.save(sd, src / "pytorch_model.bin")
    vlmptq.quantize(src, tmp_path / "whole", _config(method="rtn"))
    with caplog.at_level(logging.WARNING, logger="vlmptq.models.lazy"):
        vlmptq.quantize(src, tmp_path / "lazy", _config(method="rtn", lazy_load=True))
    assert "has no safetensors files: --lazy-load first re-saves its decoder layers" in caplog.text
    _same_checkpoint(tmp_path / "whole", tmp_path / "lazy")


def test_lazy_load_of_a_sharded_checkpoint(tiny_qwen2_vl, tmp_path):
    """Real models come in shards with a model.safetensors.index.json: the offload index must point
    each layer tensor into its own shard."""
    import shutil

    from transformers import AutoModelForImageTextToText

    src = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.bfloat16).save_pretrained(
        src, max_shard_size="300KB")
    for f in tiny_qwen2_vl.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, src / f.name)
    assert len(list(src.glob("*.safetensors"))) > 3 and (src / "model.safetensors.index.json").exists()
    vlmptq.quantize(src, tmp_path / "whole", _config())
    vlmptq.quantize(src, tmp_path / "lazy", _config(lazy_load=True))
    _same_checkpoint(tmp_path / "whole", tmp_path / "lazy")
