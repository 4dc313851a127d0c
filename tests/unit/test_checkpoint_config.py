"""quantization_config: what compressed-tensors and vLLM's config parser accept, and our parser."""

from __future__ import annotations

import json
import math

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

from vlmptq.checkpoint.config import build_quantization_config, parse_quantization_config
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.quant.scheme import WeightScheme

SCHEMES = [WeightScheme(b, g, s) for b in (2, 3, 4, 8) for g, s in ((64, False), (32, True), (-1, False))]
IGNORE = ["visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.qkv", "lm_head"]


def _json(d):
    return json.loads(json.dumps(d))  # what config.json round-trips to


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_compressed_tensors_parses_our_config(scheme):
    qc = _json(build_quantization_config(scheme, IGNORE, {"method": "vlmptq", "mu": [0.0, 0.5]}))
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized"
    assert parsed.quant_method == "compressed-tensors"
    assert parsed.quantization_status == QuantizationStatus.COMPRESSED
    assert sorted(parsed.ignore) == sorted(IGNORE)
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"] and group.input_activations is None
    w = group.weights
    assert (w.num_bits, w.symmetric, w.type) == (scheme.bits, scheme.symmetric, "int")
    assert w.group_size == (None if scheme.group_size == -1 else scheme.group_size)
    assert str(w.strategy.value if hasattr(w.strategy, "value") else w.strategy) == (
        "channel" if scheme.group_size == -1 else "group")
    assert "vlmptq" not in parsed.model_dump()  # the marker is ignored by stock loaders


@pytest.fixture(scope="module")
def vllm_ct_config():
    mod = pytest.importorskip("vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors")
    return mod.CompressedTensorsConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_vllm_compressed_tensors_config_accepts(vllm_ct_config, bits, sym):
    scheme = WeightScheme(bits, 64, sym)
    qc = _json(build_quantization_config(scheme, IGNORE, {"method": "vlmptq"}))
    cfg = vllm_ct_config.from_config(qc)
    assert cfg.quant_format == "pack-quantized"
    assert sorted(cfg.ignore) == sorted(IGNORE)
    target = cfg.target_scheme_map["Linear"]
    assert target["input_activations"] is None
    # The scheme vLLM picks for a quantized linear: weight-only WNA16 with our bits and zero points.
    layer_scheme = cfg._get_scheme_from_parts(target["weights"], None, None, format=cfg.quant_format,
                                              layer_name="model.layers.0.mlp.up_proj")
    assert type(layer_scheme).__name__ == "CompressedTensorsWNA16"
    assert layer_scheme.num_bits == bits and layer_scheme.group_size == 64
    assert bool(layer_scheme.symmetric) == sym


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_parse_round_trip(scheme):
    meta = {"method": "gptaq", "solver": {"alpha": 0.25, "act_order": False}, "calibration": {"samples": 128}}
    parsed = parse_quantization_config(_json(build_quantization_config(scheme, IGNORE, meta)))
    assert parsed.scheme == scheme
    assert parsed.targets == ("Linear",)
    assert set(parsed.ignore) == set(IGNORE)
    assert parsed.marker["format_version"] == 1 and parsed.marker["packing"] == "dense"
    assert parsed.marker["solver"] == {"alpha": 0.25, "act_order": False}


def test_parse_accepts_llm_compressor_style_w4a16():
    qc = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                  "strategy": "group", "group_size": 128}}},
        "ignore": ["lm_head"], "version": "0.9.1",
    }
    parsed = parse_quantization_config(qc)
    assert parsed.scheme == WeightScheme(4, 128, True) and parsed.marker is None


def _base():
    return _json(build_quantization_config(WeightScheme(4, 64, False), ["lm_head"]))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q: q.update(quant_method="gptq"), "quant_method is 'gptq'"),
        (lambda q: q.update(format="marlin-24") or q["config_groups"]["group_0"].pop("format"), "format is 'marlin-24'"),
        (lambda q: q["config_groups"]["group_0"].update(format="int-quantized"), "format is 'int-quantized'"),
        (lambda q: q.update(config_groups={}), "no config_groups"),
        (lambda q: q["config_groups"].update(group_1=q["config_groups"]["group_0"]),
         "group_0, group_1 all target module classes"),
        (lambda q: q["config_groups"]["group_0"].update(targets=["re:(unclosed"]), "not a valid regex"),
        (lambda q: q["config_groups"].update(group_0=["Linear"]), "preset reference"),
        (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "weight-only"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), "only integer"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=5), "bits=5"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "activation ordering"),
        (lambda q: q.update(quantization_status="frozen"), "quantization_status is 'frozen'"),
    ],
)
def test_parse_errors_say_what_is_wrong(mutate, match):
    qc = _base()
    mutate(qc)
    with pytest.raises(CheckpointError, match=match):
        parse_quantization_config(qc)


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"calibration": {"n": object()}}, r"metadata.calibration.n is a object"),
        ({"calibration": {1: 2}}, r"non-string key 1"),
        ({"packing": "padded"}, "reserved"),
    ],
)
def test_metadata_errors_name_the_key(metadata, match):
    with pytest.raises(ConfigError, match=match):
        build_quantization_config(WeightScheme(), [], metadata)


def test_metadata_is_made_json_safe():
    import numpy as np
    from pathlib import Path

    meta = {"mu": {"q": torch.tensor(0.4), "k": np.float32(0.5)}, "loss": math.nan,
            "shape": (1, 2), "src": Path("/data/x"), "n": np.int64(3)}
    marker = build_quantization_config(WeightScheme(), [], meta)["vlmptq"]
    text = json.dumps(marker, allow_nan=False)  # strict JSON
    assert json.loads(text)["mu"] == {"q": pytest.approx(0.4), "k": 0.5}
    assert marker["loss"] == "nan" and marker["shape"] == [1, 2] and marker["src"] == "/data/x"
    assert marker["n"] == 3 and type(marker["n"]) is int


def test_named_groups_for_other_schemes():
    """Modules with their own scheme (an 8-bit lm_head) get a group naming them; the parser gives each
    module its scheme by compressed-tensors' precedence (a name match over the class target)."""
    main, head = WeightScheme(3, 64, False), WeightScheme(8, 128, True)
    qc = _json(build_quantization_config(main, ["visual.x"], None, {"lm_head": head}))
    assert qc["config_groups"]["group_1"]["targets"] == [r"re:^(.*\.)?lm_head$"]
    parsed = parse_quantization_config(qc)
    assert parsed.scheme == main and parsed.targets == ("Linear",)
    assert parsed.scheme_for("lm_head") == head
    assert parsed.scheme_for("language_model.lm_head") == head  # vLLM's renamed module
    assert parsed.scheme_for("model.layers.0.mlp.down_proj") == main
    assert parsed.scheme_for("model.lm_head_norm") == main  # anchored: only a whole name component
    assert parsed.describe() == "W3 g64 asym; lm_head W8 g128 sym"
    ct = QuantizationConfig.model_validate(qc)  # compressed-tensors reads both groups
    assert ct.config_groups["group_1"].weights.num_bits == 8
    with pytest.raises(ConfigError, match="both in ignore and quantized"):
        build_quantization_config(main, ["lm_head"], None, {"lm_head": head})


def test_named_groups_only_checkpoint_needs_every_module_named():
    qc = _json(build_quantization_config(WeightScheme(4, 64, False), [], None, {"lm_head": WeightScheme(8, 64, False)}))
    qc["config_groups"]["group_0"]["targets"] = [r"re:.*q_proj$"]
    parsed = parse_quantization_config(qc)
    assert parsed.scheme_for("model.layers.0.self_attn.q_proj").bits == 4
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.up_proj' holds packed tensors but no config group"):
        parsed.scheme_for("model.layers.0.mlp.up_proj")
