"""Mixture-of-experts models (``vlmptq/models/experts.py`` and the experts' path in the pipeline) on a tiny
random Qwen3-VL-MoE (real transformers classes, experts stored transposed as the releases store them):
one linear per expert projection computes what transformers' fused experts compute, every expert is
quantized on the tokens routed to it and written per expert, lazily or not, and the options that would
split a block's experts (one fused layer in vLLM) are refused."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import vlmptq
from vlmptq.calib import CalibConfig
from vlmptq.config import SchemeOverride, make_config
from vlmptq.errors import ConfigError
from vlmptq.models.adapters import load_model
from vlmptq.models.experts import UnfusedExperts
from vlmptq.solvers.registry import build_solver
from tests.support.checkpoints import dense_copy, image_prompt_inputs

CALIB = CalibConfig(source="builtin", num_samples=3, max_seq_len=512)
EXPERTS, TOP_K, LAYERS = 8, 2, 2
LINEARS = LAYERS * (4 + 3 * EXPERTS)  # q, k, v, o and each expert's gate, up, down


def _config(**fields):
    return make_config(**{**dict(method="vlmptq", bits=4, group_size=32, device="cpu", calib=CALIB), **fields})


def _tensors(out):
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_one_linear_per_expert_computes_what_transformers_computes(tiny_qwen3_vl_moe):
    ours, adapter = load_model(tiny_qwen3_vl_moe)
    theirs = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen3_vl_moe), dtype=torch.bfloat16).eval()
    _, layers = adapter.decoder_layers()
    experts = layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and len(experts) == EXPERTS
    fused = theirs.model.language_model.layers[0].mlp.experts
    i = fused.down_proj.shape[-1]
    assert torch.equal(experts[3].gate_proj.weight, fused.gate_up_proj[3, :i])
    assert torch.equal(experts[3].up_proj.weight, fused.gate_up_proj[3, i:])
    assert torch.equal(experts[3].down_proj.weight, fused.down_proj[3])
    inputs = image_prompt_inputs(tiny_qwen3_vl_moe)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method,bits", [("vlmptq", 4), ("gptaq", 3), ("rtn", 2)])
def test_every_expert_is_quantized_and_written_per_expert(tiny_qwen3_vl_moe, tmp_path, method, bits):
    out = tmp_path / "ckpt"
    model, result, _ = vlmptq.quantize_in_memory(tiny_qwen3_vl_moe, _config(method=method, bits=bits))
    assert len(result.quantized) == LINEARS
    from vlmptq.checkpoint.writer import save_quantized_checkpoint

    save_quantized_checkpoint(model, result.quantized, out, scheme=_config(method=method, bits=bits).scheme,
                              ignore=result.frozen, source_dir=tiny_qwen3_vl_moe)
    keys = _tensors(out)
    for li in range(LAYERS):
        for e in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                stem = f"model.language_model.layers.{li}.mlp.experts.{e}.{proj}"
                assert {f"{stem}.weight_packed", f"{stem}.weight_scale", f"{stem}.weight_zero_point"} <= set(keys)
        assert f"model.language_model.layers.{li}.mlp.gate.weight" in keys  # the router: 16-bit, as vLLM serves it
    assert not any(re.search(r"experts\.(gate_up|down)_proj$", k) for k in keys)
    # The checkpoint reloads into transformers' own fused class as the fake-quant model: same logits.
    fresh = AutoModelForImageTextToText.from_pretrained(str(dense_copy(out, tmp_path / "dense"))).eval()
    inputs = image_prompt_inputs(tiny_qwen3_vl_moe)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_experts_are_calibrated_on_the_tokens_routed_to_them(tiny_qwen3_vl_moe, monkeypatch):
    """Layer 0's experts see the quantized attention's output on the embeddings, so the final fake-quant
    model reproduces their inputs: each expert's Hessian is built from exactly the rows its router picks,
    and every token reaches TOP_K experts."""
    seen: dict[str, torch.Tensor] = {}
    solver_cls = type(build_solver("gptq"))
    solve = solver_cls.solve

    def spy(self, w, stats, scheme, scale_dtype):
        seen[len(seen)] = stats.hessian.clone()
        return solve(self, w, stats, scheme, scale_dtype)

    monkeypatch.setattr(solver_cls, "solve", spy)
    model, result, _ = vlmptq.quantize_in_memory(tiny_qwen3_vl_moe, _config(method="gptq"))
    order = [r.name for r in result.records]
    hessians = {name: seen[i] for i, name in enumerate(order)}

    from vlmptq.calib import load_calibration  # the same samples the run used
    from vlmptq.models.adapters import adapter_for_model, load_processor

    samples = load_calibration(CALIB, load_processor(tiny_qwen3_vl_moe),
                               sorted(adapter_for_model(model).vision_token_ids()))
    layer = model.model.language_model.layers[0]
    rows_x: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(_mod, args):
        rows_x.append((args[0].float(), args[1]))

    handle = layer.mlp.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        for s in samples:
            model(**s.inputs, use_cache=False)
    handle.remove()
    tokens = sum(x.shape[0] for x, _ in rows_x)
    routed = {r.name: r.info["routed_tokens"] for r in result.records if "routed_tokens" in r.info}
    layer0 = [routed[f"model.language_model.layers.0.mlp.experts.{e}.gate_proj"] for e in range(EXPERTS)]
    assert sum(layer0) == TOP_K * tokens
    for e in (0, 5):
        picked = [(x[(k == e).any(-1)]) for x, k in rows_x]
        picked = [p for p in picked if p.shape[0]]
        h = sum(2 * p.t() @ p for p in picked) / len(picked)
        got = hessians[f"model.language_model.layers.0.mlp.experts.{e}.gate_proj"]
        torch.testing.assert_close(got, h, rtol=1e-4, atol=1e-4 * h.abs().max().item())
        assert torch.equal(got, hessians[f"model.language_model.layers.0.mlp.experts.{e}.up_proj"])


def test_an_expert_no_token_reaches_is_still_quantized(tiny_qwen3_vl_moe, monkeypatch, caplog):
    """An expert the calibration never routes to takes every token's statistics (named in a warning); with
    empty statistics GPTQ would zero it, and vLLM may route to it."""
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf

    route = hf.Qwen3VLMoeTextTopKRouter.forward

    def never_7(self, hidden_states):  # expert 7's tokens go to expert 0 instead (to 1 if 0 is their other pick)
        logits, scores, index = route(self, hidden_states)
        other = torch.where((index == 0).any(dim=-1, keepdim=True), 1, 0)
        return logits, scores, torch.where(index == 7, other, index)

    monkeypatch.setattr(hf.Qwen3VLMoeTextTopKRouter, "forward", never_7)
    with caplog.at_level(logging.WARNING, logger="vlmptq.pipeline.sequential"):
        model, result, _ = vlmptq.quantize_in_memory(tiny_qwen3_vl_moe, _config(method="gptq", bits=3))
    assert "no calibration token was routed to expert(s) [7]" in caplog.text
    for li in range(LAYERS):
        expert = model.model.language_model.layers[li].mlp.experts[7]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            rec = next(r for r in result.records if r.name == f"model.language_model.layers.{li}.mlp.experts.7.{proj}")
            assert rec.info["routed_tokens"] == 0 and 0 < rec.rel_error < 0.5
            assert getattr(expert, proj).weight.abs().sum(dim=1).min() > 0  # no row zeroed


def test_experts_that_see_part_of_the_tokens_are_refused_for_per_modality_statistics(tiny_qwen3_vl_moe,
                                                                                     monkeypatch):
    """A block that sends only some tokens to its experts (ERNIE 4.5-VL's text and vision experts each take their
    modality's rows) gives rows vlmptq cannot pair with the sample's vision / text masks: VLM-PTQ's per-modality
    statistics are refused by name rather than computed from misaligned masks; GPTQ, which needs no masks, runs."""
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf

    from vlmptq.errors import UnsupportedModelError

    def first_half(self, hidden_states):  # the experts see the first half of the tokens, the rest pass through
        b, t, h = hidden_states.shape
        flat = hidden_states.reshape(-1, h)
        _, weights, experts = self.gate(flat[: t // 2])
        out = flat.clone()
        out[: t // 2] = self.experts(flat[: t // 2], experts, weights)
        return out.reshape(b, t, h)

    monkeypatch.setattr(hf.Qwen3VLMoeTextSparseMoeBlock, "forward", first_half)
    with pytest.raises(UnsupportedModelError, match=r"layers\.0\.mlp\.experts: the experts receive \d+ of sample"):
        vlmptq.quantize_in_memory(tiny_qwen3_vl_moe, _config(bits=3))
    _, result, _ = vlmptq.quantize_in_memory(tiny_qwen3_vl_moe, _config(method="gptq", bits=3))
    assert len(result.quantized) == LINEARS


def test_lazy_run_writes_the_whole_model_runs_checkpoint(tiny_qwen3_vl_moe, tmp_path):
    vlmptq.quantize(tiny_qwen3_vl_moe, tmp_path / "whole", _config(bits=3))
    vlmptq.quantize(tiny_qwen3_vl_moe, tmp_path / "lazy", _config(bits=3, lazy_load=True))
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "lazy")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from vlmptq.checkpoint.reader import inspect_checkpoint

    # one VLM-PTQ mu per linear: inspect counts the values instead of printing 56 names
    assert re.search(rf"\n  mu: {LINEARS} linears: [01]\.\d x \d+", inspect_checkpoint(tmp_path / "lazy").format())


@pytest.mark.parametrize("fields,match", [
    (dict(ignore=[r"layers\.0\.mlp\.experts\.3\."]),
     r"--ignore keeps 3 of the 24 expert linears of model\.language_model\.layers\.0\.mlp\.experts in 16-bit.*one "
     r"fused layer with one scheme"),
    (dict(overrides=[SchemeOverride.parse(r"experts\.[0-3]\.=2")]),
     r"--override gives the experts of model\.language_model\.layers\.0\.mlp\.experts different schemes \(W2 g32 "
     r"asym, W4 g32 asym\)"),
])
def test_options_that_split_a_blocks_experts_are_refused(tiny_qwen3_vl_moe, tmp_path, no_weights, fields, match):
    with pytest.raises(ConfigError, match=match):
        vlmptq.quantize(tiny_qwen3_vl_moe, tmp_path / "out", _config(**fields))
    assert not (tmp_path / "out").exists()


def test_experts_at_their_own_bits_or_kept_in_16_bit(tiny_qwen3_vl_moe, tmp_path):
    experts_w2 = [SchemeOverride.parse(r"experts\.=2")]
    mixed = vlmptq.quantize(tiny_qwen3_vl_moe, tmp_path / "w2", _config(method="rtn", overrides=experts_w2))
    assert mixed.checkpoint.n_quantized == LINEARS
    assert re.search(r"experts.*W2 g32 asym", mixed.checkpoint.scheme), mixed.checkpoint.scheme
    kept = vlmptq.quantize(tiny_qwen3_vl_moe, tmp_path / "attn", _config(method="rtn", ignore=[r"mlp\.experts\."]))
    assert kept.checkpoint.n_quantized == LAYERS * 4
    keys = _tensors(tmp_path / "attn")
    assert "model.language_model.layers.0.mlp.experts.5.down_proj.weight" in keys
    assert "model.language_model.layers.0.self_attn.q_proj.weight_packed" in keys


def test_dry_run_plans_what_the_run_writes(tiny_qwen3_vl_moe, tmp_path):
    from vlmptq.plan import plan

    config = _config(method="rtn", bits=2, overrides=[SchemeOverride.parse(r"self_attn\.=4")])
    p = plan(tiny_qwen3_vl_moe, config)
    summary = vlmptq.quantize(tiny_qwen3_vl_moe, tmp_path / "out", config).checkpoint
    assert {s.scheme: s.linears for s in p.shares} == {"W2 g32 asym": LAYERS * 3 * EXPERTS, "W4 g32 asym": LAYERS * 4}
    assert sum(s.nbytes for s in p.shares) == summary.bytes_quantized_layers
    assert p.nbytes == summary.bytes_total
