"""``vlmptq/models/experts.py`` on transformers' own Qwen3-VL-MoE sparse block (random weights): the unfused
experts compute what the fused ones compute, to the bit; layouts we do not take are refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig

from vlmptq.errors import UnsupportedModelError
from vlmptq.models.experts import UnfusedExperts, routers, unfuse, unfuse_experts


def _block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen3VLMoeTextConfig(hidden_size=64, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2)
    block = hf.Qwen3VLMoeTextSparseMoeBlock(cfg)
    for p in block.parameters():
        p.data.normal_(0, 0.1)
    return block.eval()


def test_unfused_experts_are_the_fused_ones_bit_for_bit():
    block = _block()
    x = torch.randn(1, 40, 64)
    with torch.no_grad():
        want = block(x)
        layers = nn.ModuleList([nn.Module()])
        layers[0].mlp = block
        assert unfuse_experts(layers) == 1 and unfuse_experts(layers) == 0  # idempotent
        assert isinstance(block.experts, UnfusedExperts) and len(block.experts) == 6
        got = block(x)
    assert torch.equal(got, want)
    assert [n for n, m in block.named_modules() if isinstance(m, nn.Linear)][:3] == [
        "experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"]
    assert routers(layers[0]) == ["mlp.gate"]


def test_an_expert_no_token_is_routed_to_contributes_nothing():
    block = _block()
    experts = unfuse(block.experts)
    x = torch.randn(10, 64)
    idx = torch.tensor([[0, 1]] * 10)
    out = experts(x, idx, torch.full((10, 2), 0.5))
    want = 0.5 * experts[0](x) + 0.5 * experts[1](x)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("flag,value,what", [("is_transposed", True, "transposed weights"),
                                             ("has_bias", True, "biases"),
                                             ("is_concatenated", False, "interleaved gate/up rows")])
def test_layouts_we_do_not_take_are_refused(flag, value, what):
    experts = _block().experts
    setattr(experts, flag, value)
    with pytest.raises(UnsupportedModelError, match=f"does not quantize yet \\({what}\\)"):
        unfuse(experts, "model.layers.0.mlp.experts")


def test_a_blocks_experts_are_one_allocation_unit():
    from vlmptq.pipeline.sensitivity import fusion_units

    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.experts.0.gate_proj",
             "mlp.experts.0.up_proj", "mlp.experts.0.down_proj", "mlp.experts.1.gate_proj", "mlp.experts.1.up_proj",
             "mlp.experts.1.down_proj"]
    assert fusion_units(names, ["mlp.experts"]) == [tuple(names[:3]), tuple(names[3:])]
