"""The plugin's registration, claim rule and config parsing (real vLLM classes, no engine)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from vlmptq.checkpoint.config import build_quantization_config
from vlmptq.errors import CheckpointError, ConfigError
from vlmptq.quant.scheme import WeightScheme

pytest.importorskip("vllm")
from vllm.model_executor.layers.quantization import (  # noqa: E402
    QUANTIZATION_METHODS,
    get_quantization_config,
)

import vllm_plugin  # noqa: E402
from vllm_plugin.config import VlmptqConfig, claims_checkpoint  # noqa: E402
from vllm_plugin.validation import ServingScheme  # noqa: E402

IGNORE = [
    "lm_head",
    "model.visual.blocks.0.attn.qkv",
    "visual.blocks.0.attn.qkv",
    "visual.merger.mlp.0",
]


def ours(bits=3, group=64, symmetric=False):
    return build_quantization_config(
        WeightScheme(bits, group, symmetric), IGNORE, {"method": "rtn"}
    )


def test_entry_point_points_at_register():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("vlmptq") == "vllm_plugin:register"


def test_importing_the_plugin_and_its_kernels_does_not_import_vllm():
    code = (
        "import sys, vllm_plugin, vllm_plugin.kernels, vllm_plugin.kernels.reference, "
        "vllm_plugin.kernels.cpu, vllm_plugin.validation; "
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_is_idempotent_and_registers_the_config():
    vllm_plugin.register()
    vllm_plugin.register()
    assert QUANTIZATION_METHODS.count("vlmptq") == 1
    assert get_quantization_config("vlmptq") is VlmptqConfig


@pytest.mark.parametrize(
    "user,marker,claimed",
    [
        (None, True, True),
        (None, False, False),
        ("vlmptq", False, True),
        ("vlmptq", True, True),
        ("compressed-tensors", True, False),
        ("compressed-tensors", False, False),
    ],
)
def test_claim_rule(user, marker, claimed):
    qc = ours()
    if not marker:
        del qc["vlmptq"]
    assert claims_checkpoint(qc, user) is claimed
    assert VlmptqConfig.override_quantization_method(qc, user) == ("vlmptq" if claimed else None)


def test_asking_for_vlmptq_on_another_format_says_what_to_do():
    with pytest.raises(ConfigError, match=r"quant_method is 'gptq'. Drop the flag"):
        claims_checkpoint({"quant_method": "gptq", "bits": 4}, "vlmptq")
    assert claims_checkpoint({"quant_method": "gptq"}, None) is False


@pytest.mark.parametrize(
    "bits,group,symmetric", [(2, 64, False), (3, 32, False), (4, 64, True), (4, -1, False)]
)
def test_reads_what_our_writer_writes(bits, group, symmetric):
    cfg = VlmptqConfig.from_config(ours(bits, group, symmetric))
    assert cfg.get_name() == "vlmptq"
    assert cfg.target_schemes == {"Linear": ServingScheme(bits, group, symmetric)}
    assert cfg.ignore == sorted(IGNORE)


def _broken(path, value, qc=None):
    qc = qc or ours()
    node = qc
    *parents, last = path
    for p in parents:
        node = node[p]
    node[last] = value
    return qc


W = ("config_groups", "group_0", "weights")


@pytest.mark.parametrize(
    "qc,message",
    [
        (
            _broken((*W, "num_bits"), 5),
            r"group_0.weights: num_bits=5 is not supported .*\(2, 3, 4, 8\)",
        ),
        (_broken((*W, "actorder"), "group"), r"actorder is 'group' \(needs g_idx\)"),
        (
            _broken((*W, "strategy"), "tensor", _broken((*W, "group_size"), None)),
            r"strategy is 'tensor'; vlmptq serves 'group' and 'channel'",
        ),
        (_broken((*W, "type"), "float"), r"type is .*float.*; vlmptq serves int weights"),
        (
            _broken(
                ("config_groups", "group_0", "input_activations"), {"num_bits": 8, "type": "int"}
            ),
            r"activation quantization is set",
        ),
        (
            _broken(("config_groups", "group_0", "format"), "int-quantized"),
            r"format 'int-quantized' is not served",
        ),
        (_broken(("config_groups",), {}), r"no config_groups"),
        (_broken(("quantization_status",), "frozen"), r"quantization_status is 'frozen'"),
        (_broken(("quant_method",), "gptq"), r"quant_method is 'gptq'"),
    ],
    ids=[
        "bits",
        "actorder",
        "strategy",
        "float",
        "act-quant",
        "format",
        "no-groups",
        "status",
        "method",
    ],
)
def test_unsupported_checkpoints_are_refused_with_the_key_and_the_fix(qc, message):
    with pytest.raises(CheckpointError, match=message):
        VlmptqConfig.from_config(qc)


def test_several_config_groups_map_targets_to_their_schemes():
    qc = ours(3, 64)
    lm_head = copy.deepcopy(qc["config_groups"]["group_0"])
    lm_head["targets"] = ["re:.*lm_head"]
    lm_head["weights"]["num_bits"] = 8
    qc["config_groups"]["group_1"] = lm_head
    cfg = VlmptqConfig.from_config(qc)
    assert cfg.target_schemes == {
        "Linear": ServingScheme(3, 64, False),
        "re:.*lm_head": ServingScheme(8, 64, False),
    }


def test_lm_head_target_selects_vllms_lm_head_only():
    """What vlmptq writes for a quantized head selects vLLM's ParallelLMHead (renamed
    ``language_model.lm_head`` in VLMs) and nothing else; without it the head stays vLLM's."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    qc = json.loads(json.dumps(build_quantization_config(
        WeightScheme(3, 64, False), ["visual.blocks.0.attn.qkv"], None, {"lm_head": WeightScheme(8, 64, False)})))
    cfg = VlmptqConfig.from_config(qc)
    head = ParallelLMHead.__new__(ParallelLMHead)  # get_quant_method reads the type and the name only
    linear = LinearBase.__new__(LinearBase)
    torch.nn.Module.__init__(head)
    torch.nn.Module.__init__(linear)
    for prefix in ("lm_head", "language_model.lm_head"):
        method = cfg.get_quant_method(head, prefix)
        assert type(method).__name__ == "VlmptqLinearMethod" and method.scheme == ServingScheme(8, 64, False)
    assert cfg.get_quant_method(linear, "language_model.model.layers.0.mlp.down_proj").scheme == ServingScheme(3, 64, False)
    assert cfg.get_quant_method(head, "language_model.model.lm_head_extra") is None
    unquantized_head = VlmptqConfig.from_config(ours(3, 64))
    assert unquantized_head.get_quant_method(head, "language_model.lm_head") is None



def test_ignored_fused_shards_are_found_without_the_models_mapping():
    """vLLM 0.32's LLaVA-OneVision class has no ``packed_modules_mapping``: its vision tower's fused
    ``qkv_proj`` must still be served unquantized when the checkpoint ignores q, k and v (it was taken
    as quantized and the dense weight then failed to load deep inside vLLM). GLM-4.1V's mapping has
    ``gate_up_proj`` stored fused (its language model) while its vision tower stores gate and up apart:
    explicit entries for every shard still mark the tower's layer, and the fused one stays quantized."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    qc = ours(3, 64)
    tower = "vision_tower.vision_model.encoder.layers.0"
    qc["ignore"] = [f"{tower}.self_attn.{p}_proj" for p in "qkv"] + [f"{tower}.mlp.{p}_proj" for p in ("gate", "up")]
    cfg = VlmptqConfig.from_config(qc)
    linear = LinearBase.__new__(LinearBase)
    torch.nn.Module.__init__(linear)

    def method(prefix):
        return type(cfg.get_quant_method(linear, prefix)).__name__

    assert cfg.packed_modules_mapping == {}
    assert method(f"{tower}.self_attn.qkv_proj") == "UnquantizedLinearMethod"
    assert method(f"{tower}.mlp.gate_up_proj") == "UnquantizedLinearMethod"
    assert method("language_model.model.layers.0.self_attn.qkv_proj") == "VlmptqLinearMethod"
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_up_proj"]}
    assert method(f"{tower}.self_attn.qkv_proj") == "UnquantizedLinearMethod"
    assert method(f"{tower}.mlp.gate_up_proj") == "UnquantizedLinearMethod"
    assert method("language_model.model.layers.0.mlp.gate_up_proj") == "VlmptqLinearMethod"
    qc["ignore"].append("language_model.model.layers.1.mlp.gate_up_proj")  # ignored under its fused name
    cfg = VlmptqConfig.from_config(qc)
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_up_proj"]}
    assert method("language_model.model.layers.1.mlp.gate_up_proj") == "UnquantizedLinearMethod"


def test_vllm_name_mapping_renames_layer_paths_only():
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    qc = ours()
    qc["ignore"] = [
        "lm_head",
        "re:.*visual.*",
        "model.visual.blocks.0.attn.qkv",
        "model.layers.0.mlp.down_proj",
    ]
    cfg = VlmptqConfig.from_config(qc)
    cfg.apply_vllm_mapper(Qwen2VLForConditionalGeneration.hf_to_vllm_mapper.get_rename_mapper())
    assert cfg.ignore == [
        "lm_head",
        "re:.*visual.*",
        "visual.blocks.0.attn.qkv",
        "language_model.model.layers.0.mlp.down_proj",
    ]
    assert list(cfg.target_schemes) == ["Linear"]


@pytest.mark.parametrize("model", ["qwen2_vl.Qwen2VLForConditionalGeneration",
                                   "qwen3_vl.Qwen3VLForConditionalGeneration"])
def test_targets_naming_one_module_follow_the_models_renaming(model):
    """Mixed precision names modules by a regex of their checkpoint name (``model.language_model.layers.0...``);
    vLLM's Qwen-VL classes rename that prefix (``language_model.model.``), and a layer the regex no longer
    matched fell back to the ``Linear`` group's scheme, then failed to load its tensors."""
    import importlib

    import torch
    from vllm.model_executor.layers.linear import LinearBase

    module, cls = model.split(".")
    mapper = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls).hf_to_vllm_mapper
    down0 = "model.language_model.layers.0.mlp.down_proj"
    qc = json.loads(json.dumps(build_quantization_config(
        WeightScheme(2, 32, False), ["model.visual.blocks.0.attn.qkv"], None, {down0: WeightScheme(4, 32, False)})))
    cfg = VlmptqConfig.from_config(qc)
    cfg.apply_vllm_mapper(mapper)
    linear = LinearBase.__new__(LinearBase)
    torch.nn.Module.__init__(linear)
    for layer, bits in ((0, 4), (1, 2)):
        method = cfg.get_quant_method(linear, f"language_model.model.layers.{layer}.mlp.down_proj")
        assert method.scheme == ServingScheme(bits, 32, False)
