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


def test_llama4_block_is_transformers_own_with_inputs_scaled_per_expert():
    """Llama 4: transposed experts run as one bmm over every token, the sigmoid router score scaling the expert's
    input. The converted block gives transformers' output (bf16: to the bit) and feeds each expert only its routed
    tokens, already scaled: what vLLM's apply_router_weight_on_input gives the expert."""
    from transformers.models.llama4 import modeling_llama4 as l4
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig

    from vlmptq.models.llama4 import Llama4RoutedMoE, unfuse_llama4_moe

    torch.manual_seed(0)
    config = Llama4TextConfig(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=1)
    block = l4.Llama4TextMoe(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    layers = nn.ModuleList([nn.Module()])
    layers[0].feed_forward = block
    assert unfuse_llama4_moe(layers) == 1
    ours = layers[0].feed_forward
    assert isinstance(ours, Llama4RoutedMoE) and ours.router is block.router
    x = torch.randn(2, 24, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want, want_logits = block(x)
        seen = {}
        hooks = [ours.experts[e].register_forward_pre_hook(lambda m, a, e=e: seen.setdefault(e, a[0]))
                 for e in range(4)]
        got, logits = ours(x)
        for h in hooks:
            h.remove()
    assert torch.equal(got, want) and torch.equal(logits, want_logits)
    flat = x.reshape(-1, 64)
    scores, _ = block.router(flat)
    for e, rows in seen.items():
        routed = scores[:, e] > 0
        assert torch.equal(rows, flat[routed] * scores[routed, e, None])
    assert sum(r.shape[0] for r in seen.values()) == flat.shape[0]
    with torch.no_grad():  # the fused tensors' columns became the linears' rows
        torch.testing.assert_close(ours.experts[2].up_proj.weight, block.experts.gate_up_proj[2, :, 32:].t(),
                                   rtol=0, atol=0)
        torch.testing.assert_close(ours.experts[2].down_proj.weight, block.experts.down_proj[2].t(), rtol=0, atol=0)
