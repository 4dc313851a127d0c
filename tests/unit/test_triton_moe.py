"""The fused low-bit mixture-of-experts path (vllm_plugin/kernels/triton/moe.py): routing alignment and expert
repacking in torch here, the grouped Triton kernel through the Triton interpreter (a subprocess, as in
test_triton_interpret.py: the interpreter must be on before triton is imported; fp16 only there, bf16 and the
PTX run in tests/gpu/test_triton_moe_cuda.py), and its sm_90 compile in test_triton_sm90.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from tests.support.case_worker import emit, parse_cases
from vllm_plugin.kernels.triton import moe
from vllm_plugin.kernels.triton.configs import KernelConfig, load_table
from vllm_plugin.kernels.triton.layout import repack

REPO = Path(__file__).resolve().parents[2]

# name, bits, group (None: per-channel), hidden, intermediate, experts, top-k, tokens, symmetric,
# (block_m, block_n) of both launches (None: the registered op with its default configs), sort the rows by expert
# (None: the op's choice, moe.sorts)
CASES = [
    ("w2-g32-t1", 2, 32, 256, 128, 4, 2, 1, False, None),  # decode: unsorted, a block per routed row
    ("w4-g128-unsorted-shared-experts", 4, 128, 256, 128, 4, 2, 6, False, (16, 128), False),
    ("w2-g64-t1-sorted", 2, 64, 256, 128, 4, 2, 1, True, (16, 128), True),
    ("w3-g64-sym-t5-raggedK", 3, 64, 512, 128, 5, 2, 5, True, (16, 128)),  # I = 128 < W3's 512-column block
    ("w4-g64-raggedK-t7", 4, 64, 192, 320, 3, 2, 7, False, (16, 128)),  # N = 192: a masked tile
    ("w4-perchannel-bm64-scaled", 4, None, 256, 128, 4, 3, 40, False, (64, 32)),
    ("w2-g128-16experts-top4", 2, 128, 256, 256, 16, 4, 3, False, (16, 128)),  # most experts get no row
    ("w3-g32-blocks-per-expert", 3, 32, 512, 64, 2, 1, 37, False, (16, 128)),  # 3 blocks for one expert
    ("w4-g32-sym-op-t300", 4, 32, 128, 128, 6, 2, 300, True, None),  # default: 128-row blocks, scaled
    ("w3-g64-gelu-tanh-t5", 3, 64, 256, 128, 4, 2, 5, False, (16, 128), True, "gelu_tanh"),  # Gemma 4's experts
    ("w2-g32-gelu-tanh-op-t1", 2, 32, 256, 128, 4, 2, 1, False, None, None, "gelu_tanh"),
]
TOLERANCE = 2e-3  # fp16 output rounding; a wrong row, expert or scale gives > 0.1


# ----------------------------------------------------------------------------- routing (torch)
def _check_alignment(ids: torch.Tensor, num_experts: int, bm: int) -> None:
    rows, block_expert, nblocks = moe.align_routed(ids, num_experts, bm)
    r = ids.numel()
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    want_blocks = int(((counts + bm - 1) // bm).sum())
    assert int(nblocks) == want_blocks <= block_expert.numel() == moe.block_capacity(r, num_experts, bm)
    assert rows.numel() == bm * block_expert.numel()
    real = rows[: want_blocks * bm].view(want_blocks, bm)
    assert sorted(real[real < r].tolist()) == list(range(r))  # every routed row exactly once
    assert (rows[want_blocks * bm:] == r).all()
    for b in range(want_blocks):  # a block holds one expert's rows, in token order
        got = real[b][real[b] < r]
        assert len(got) > 0 and (flat[got.long()] == block_expert[b]).all()
        assert got.tolist() == sorted(got.tolist())


@pytest.mark.parametrize("tokens,top_k,experts,bm", [(1, 8, 128, 16), (3, 2, 4, 16), (37, 1, 2, 16),
                                                      (64, 8, 128, 64), (5, 4, 16, 128)])
def test_align_routed_covers_every_row_once(tokens, top_k, experts, bm):
    gen = torch.Generator().manual_seed(tokens * 100 + experts)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    _check_alignment(ids, experts, bm)


def test_align_routed_capacity_is_tight_for_skewed_routing():
    """All rows on one expert, and one row per expert: the two ends of the capacity bound."""
    _check_alignment(torch.zeros(50, 1, dtype=torch.int64), 8, 16)  # 4 blocks of one expert
    _check_alignment(torch.arange(8).view(1, 8), 8, 16)  # 8 blocks of one row
    assert moe.block_capacity(8, 128, 16) == 8 and moe.block_capacity(65536, 128, 64) == 1150


def test_rows_are_sorted_beyond_a_few():
    assert not moe.sorts(8, 128, 8) and not moe.sorts(32, 128, 8) and moe.sorts(33, 128, 8)  # 30B-A3B: T <= 4
    assert not moe.sorts(2, 8, 2) and moe.sorts(4, 8, 2)  # few experts: only one token's rows go unsorted


def test_repack_experts_stacks_per_expert_repacks():
    """Gate and up rows interleave (gate row j at 2j, up row j at 2j + 1: the kernel's SiLU-and-multiply
    epilogue finds a pair in one tile); a single projection stacks as repacked."""
    gen = torch.Generator().manual_seed(0)
    experts = moe.random_experts(3, 128, 96, 3, 32, torch.bfloat16, gen)
    q, sz = moe.repack_experts(experts["w13"], 3, 128, torch.bfloat16)
    assert q.shape[:3] == (3, 3, 192) and sz.shape[0] == 3 and sz.shape[2] == 192
    for e in range(3):
        gate, up = (repack(*p, 3, 128, torch.bfloat16) for p in experts["w13"][e])
        assert torch.equal(q[e][:, 0::2], gate[0]) and torch.equal(q[e][:, 1::2], up[0])
        assert torch.equal(sz[e][:, 0::2], gate[1]) and torch.equal(sz[e][:, 1::2], up[1])
    q2, sz2 = moe.repack_experts(experts["w2"], 3, 96, torch.bfloat16)
    assert torch.equal(q2[1], repack(*experts["w2"][1][0], 3, 96, torch.bfloat16)[0])
    with pytest.raises(ValueError, match="no experts"):
        moe.repack_experts([], 3, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="gate and up of one shape"):
        narrow = moe.random_experts(1, 128, 64, 3, 32, torch.bfloat16, gen)["w13"][0][1]  # up with 64 rows
        moe.repack_experts([[experts["w13"][0][0], narrow]], 3, 128, torch.bfloat16)


def test_moe_config_tuned_prefix(tmp_path, monkeypatch):
    """``moe-`` keys of a tuned file drive the grouped launches (M bucket: routed rows per expert); the dense
    keys of the same shape do not."""
    entry = {"1": {"path": "dot", "block_n": 32, "block_m": 16, "num_warps": 4, "num_stages": 3}}
    (tmp_path / "meta.json").write_text(json.dumps({"configs": {
        "moe-w4g128:1536x2048": entry, "w4g128:768x2048": {"1": {"path": "dot", "block_n": 16}}}}))
    monkeypatch.setenv("VLMPTQ_TRITON_CONFIG_DIR", str(tmp_path))
    load_table.cache_clear()
    moe.moe_config.cache_clear()
    try:
        assert moe.moe_config("meta", 4, 128, 1536, 2048, 1) == KernelConfig("dot", block_n=32, num_stages=3)
        assert moe.moe_config("meta", 4, 128, 768, 2048, 1).block_n == 128  # dense key ignored: the default
        assert moe.moe_config("meta", 4, 128, 768, 2048, 1000).path == "dot"  # never the dequantize path
        (tmp_path / "meta.json").write_text(json.dumps({"configs": {"moe-w4:8x256": {"1": {"path": "dequant"}}}}))
        load_table.cache_clear()
        with pytest.raises(ValueError, match="bad kernel config file .*moe-w4:8x256: the grouped MoE kernel has only"):
            moe.moe_config("meta", 4, 128, 8, 256, 1)
    finally:
        load_table.cache_clear()
        moe.moe_config.cache_clear()


# ----------------------------------------------------------------------------- kernels (interpreter)
def _run_case(name, bits, group, hidden, inter, experts, top_k, tokens, sym, tiles, sort=None,
              activation="silu") -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    ex = moe.random_experts(experts, hidden, inter, bits, group, torch.float16, gen, symmetric=sym)
    w13 = moe.repack_experts(ex["w13"], bits, hidden, torch.float16)
    w2 = moe.repack_experts(ex["w2"], bits, inter, torch.float16)
    x = torch.randn(tokens, hidden, generator=gen).half()
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    if tiles is None:
        y = torch.ops.vlmptq.wna16_moe(x, ids, weights, *w13, *w2, bits, activation)
    else:
        cfg = KernelConfig("dot", block_m=tiles[0], block_n=tiles[1], num_stages=1)
        y = moe.fused_moe(x, ids, weights, *w13, *w2, bits, activation, configs=(cfg, cfg), sort=sort)
    ref = moe.reference_moe(x, ids, weights, ex, bits, activation)
    return {"name": name, "rel_err": ((y.float() - ref).norm() / ref.norm()).item(),
            "finite": bool(torch.isfinite(y).all()), "shape": list(y.shape), "dtype": str(y.dtype)}


ALIGN_CASES = [(1, 8, 128, 16), (3, 2, 4, 16), (37, 1, 2, 16), (64, 8, 128, 64), (5, 4, 16, 128), (100, 6, 60, 16),
               (128, 8, 128, 16)]  # tokens, top-k, experts, block_m


def _align_cases() -> dict:
    """The one-program Triton alignment against align_routed (torch): the same rows and experts per real block."""
    bad = []
    for t, k, e, bm in ALIGN_CASES:
        gen = torch.Generator().manual_seed(t * 100 + e)
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        for dtype in (torch.int32, torch.int64):
            launch, (rows, block_expert, nblocks) = moe.plan_align_launch(ids.to(dtype), e, bm)
            launch.run()
            want_rows, want_experts, want_n = moe.align_routed(ids, e, bm)
            n = int(want_n)
            if not (int(nblocks) == n and torch.equal(rows[:n * bm], want_rows[:n * bm])
                    and torch.equal(block_expert[:n], want_experts[:n])):
                bad.append([t, k, e, bm, str(dtype)])
    return {"name": "align", "cases": len(ALIGN_CASES) * 2, "mismatches": bad}


def _self_check_verdicts() -> dict:
    """The first-use check in the interpreter: the kernel passes; a kernel 1 % off, or one that raises, is
    refused with the reason (through the plugin's shared self-check, kernel "triton_moe")."""
    from vllm_plugin.kernels.triton import selfcheck

    real = moe.fused_moe
    res = {"name": "self-check", "ok": selfcheck.self_check(2, 64, torch.float16, "cpu", "triton_moe")}
    try:
        moe.fused_moe = lambda *a, **kw: real(*a, **kw) * 1.01
        res["off_by_1pc"] = selfcheck.self_check(4, 32, torch.float16, "cpu", "triton_moe")

        def broken(*a, **kw):
            raise RuntimeError("PTX does not assemble")

        moe.fused_moe = broken
        res["raises"] = selfcheck.self_check(4, 64, torch.float16, "cpu", "triton_moe")
    finally:
        moe.fused_moe = real
        selfcheck._VERDICTS.clear()
    return res


def _moe_config(experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype, tp: int = 1):
    """vLLM's own description of a MoE block (what its FusedMoE layer hands the quantization method); ``tp``:
    rank 0 of that many."""
    from dataclasses import replace

    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        MoEActivation,
        RoutingMethodType,
    )

    par = replace(FusedMoEParallelConfig.make_no_parallel(), tp_size=tp)
    return FusedMoEConfig(num_experts=experts, experts_per_token=top_k, hidden_dim=hidden, intermediate_size=inter,
                          num_local_experts=experts, num_logical_experts=experts, activation=MoEActivation.SILU,
                          device="cpu", routing_method=RoutingMethodType.Renormalize, moe_parallel_config=par,
                          in_dtype=dtype)


def test_moe_methods_refuse_a_tensor_parallel_cut_inside_a_group():
    """Tensor parallel 4 over 384 intermediate features leaves each rank 96: not whole 64-groups of down_proj's
    inputs: refused at load, naming the sizes that work. Tensor parallel 2 (192 per rank: 3 groups) loads."""
    from vlmptq.errors import ConfigError
    from vllm_plugin.moe import VlmptqReferenceMoEMethod
    from vllm_plugin.validation import ServingScheme

    method = VlmptqReferenceMoEMethod(_moe_config(4, 256, 384, 2, torch.float32, tp=4), ServingScheme(3, 64, False),
                                      "model.layers.0.mlp.experts")
    with pytest.raises(ConfigError, match=r"tensor parallel 4 gives each rank 96 of the experts' 384 intermediate "
                                          r"features, not a whole number of group_size=64 groups .* divides 6"):
        method.create_weights(torch.nn.Module(), 4, 256, 96, torch.float32)
    ok = VlmptqReferenceMoEMethod(_moe_config(4, 256, 384, 2, torch.float32, tp=2), ServingScheme(3, 64, False),
                                  "model.layers.0.mlp.experts")
    layer = torch.nn.Module()
    ok.create_weights(layer, 4, 256, 192, torch.float32)
    assert layer.w2_weight_scale.shape == (4, 256, 3) and ok._full_dims("w2") == (256, 384)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_fused_verdict_says_why_not(monkeypatch):
    """Where the plugin cannot use the fused kernel, experts_method's log gets the reasons (then vLLM's kernels
    or the reference serve the block)."""
    from vllm_plugin.moe import fused_verdict
    from vllm_plugin.validation import ServingScheme

    cfg = _moe_config(8, 256, 128, 2, torch.bfloat16)
    ok, why = fused_verdict(cfg, ServingScheme(3, 64, False))
    assert not ok and why == "needs a CUDA device, the layer is on 'cpu'"
    ok, why = fused_verdict(cfg, ServingScheme(8, 16, True))
    assert not ok and "8-bit weights" in why and "group size 16 is not a multiple of 32" in why
    assert why.count("needs a CUDA device") == 1  # both projections' reasons, once each
    assert "activation dtype torch.float32" in fused_verdict(_moe_config(8, 256, 128, 2, torch.float32),
                                                             ServingScheme(4, 64, False))[1]
    monkeypatch.setenv("VLMPTQ_DISABLED_KERNELS", "triton_moe")
    assert fused_verdict(cfg, ServingScheme(3, 64, False)) == (False, "disabled by VLMPTQ_DISABLED_KERNELS")


def _plugin_methods() -> dict:
    """vllm_plugin.moe's fused method beside its reference method, with vLLM's own config class, on the same
    checkpoint tensors handed over as vLLM's loader does (per expert and shard): create_weights, weight_loader,
    process_weights_after_loading (the repack), apply. (On a CPU experts_method never picks the fused method: it
    needs CUDA; here it runs on the interpreter.)"""
    from vllm_plugin.moe import VlmptqFusedMoEMethod, VlmptqReferenceMoEMethod
    from vllm_plugin.validation import ServingScheme

    e_, h, i, top_k, bits, group = 4, 256, 192, 2, 3, 64
    cfg = _moe_config(e_, h, i, top_k, torch.float16)
    gen = torch.Generator().manual_seed(5)
    ex = moe.random_experts(e_, h, i, bits, group, torch.float16, gen)
    x = torch.randn(6, h, generator=gen).half()
    ids = torch.stack([torch.randperm(e_, generator=gen)[:top_k] for _ in range(6)]).to(torch.int32)
    weights = torch.softmax(torch.randn(6, top_k, generator=gen), dim=-1)
    ref = moe.reference_moe(x, ids, weights, ex, bits, "silu")
    # Llama 4's blocks: one expert per token, its weight scaling the expert's input (apply_router_weight_on_input)
    ids1, weights1 = ids[:, :1].contiguous(), weights[:, :1]
    ref1 = moe.reference_moe(x * weights1.to(x.dtype), ids1, torch.ones_like(weights1), ex, bits, "silu")
    res = {"name": "plugin-methods"}
    for cls in (VlmptqReferenceMoEMethod, VlmptqFusedMoEMethod):
        method = cls(cfg, ServingScheme(bits, group, False), "model.layers.0.mlp.experts")
        layer = torch.nn.Module()
        method.create_weights(layer, e_, h, i, torch.float16)
        for e in range(e_):
            for proj, shard, (wp, scale, zp), n, k in [("w13", "w1", ex["w13"][e][0], i, h),
                                                       ("w13", "w3", ex["w13"][e][1], i, h),
                                                       ("w2", "w2", ex["w2"][e][0], h, i)]:
                for t, v in (("weight_packed", wp), ("weight_scale", scale), ("weight_zero_point", zp),
                             ("weight_shape", torch.tensor([n, k]))):
                    param = getattr(layer, f"{proj}_{t}")
                    param.weight_loader(param, v, weight_name=f"experts.{e}.{t}", shard_id=shard, expert_id=e)
        method.process_weights_after_loading(layer)
        y = method.apply(layer, x, weights, ids)
        res[cls.__name__] = {"rel_err": ((y.float() - ref).norm() / ref.norm()).item(), "dtype": str(y.dtype),
                             "params": sorted(n for n, _ in layer.named_parameters())}
        layer.apply_router_weight_on_input = True
        y1 = method.apply(layer, x, weights1, ids1)
        res[cls.__name__]["on_input_rel_err"] = ((y1.float() - ref1).norm() / ref1.norm()).item()
        try:
            method.apply(layer, x, weights, ids)
        except Exception as e:  # two experts per token cannot take the weight on the input
            res[cls.__name__]["on_input_top2"] = f"{type(e).__name__}: {e}"
    return res


MODEL_TOL = 5e-3  # fp16 logits through 2 MoE layers: measured 1.1e-3; routing weights on the wrong experts: 0.63


def _model_case() -> dict:
    """A tiny Qwen3-VL-MoE whose routed experts (W3 g64, RTN) run through the fused op with transformers' own
    routing, against the same model holding the dequantized experts (tests/support/kernel_model.py)."""
    import tempfile

    from tests.support.kernel_model import logits_through_fused_moe
    from vlmptq.testing.tiny_vlm import build_tiny_qwen_vl

    tiny = build_tiny_qwen_vl(tempfile.mkdtemp(prefix="vlmptq-tiny-moe-"), "qwen3_vl_moe")
    a, b = logits_through_fused_moe(tiny, 3, 64, False, torch.float16, "cpu")
    return {"name": "model", "finite": bool(torch.isfinite(b).all()), "rel_err": ((a - b).norm() / a.norm()).item()}


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case in CASES:
        emit(case[0], lambda: _run_case(*case))
    for name, run in (("align", _align_cases), ("self-check", _self_check_verdicts),
                      ("plugin-methods", _plugin_methods), ("model", _model_case)):
        emit(name, run)


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, __file__, "--worker"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    results = parse_cases(p.stdout)
    if not results:
        pytest.fail(f"interpreter worker produced no results (rc={p.returncode}):\n{p.stderr[-3000:]}")
    return results


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_moe_matches_reference(interpreted, case):
    r = interpreted.get(case[0])
    assert r is not None, f"case {case[0]} did not run"
    assert "error" not in r, r["error"]
    assert r["finite"] and r["shape"] == [case[7], case[3]] and r["dtype"] == "torch.float16"
    assert r["rel_err"] < TOLERANCE, f"relative error {r['rel_err']:.2e}"


def test_align_kernel_matches_torch_alignment(interpreted):
    r = interpreted.get("align")
    assert r is not None and "error" not in r, r
    assert r["cases"] == 2 * len(ALIGN_CASES) and r["mismatches"] == []


def test_moe_self_check_accepts_the_kernel_and_refuses_a_wrong_one(interpreted):
    r = interpreted.get("self-check")
    assert r is not None and "error" not in r, r
    assert r["ok"] is None
    assert r["off_by_1pc"] and r["off_by_1pc"].startswith("relative error") and "at T = 1 " in r["off_by_1pc"]
    assert r["raises"] == "RuntimeError: PTX does not assemble"



def test_tiny_moe_model_through_the_fused_kernel(interpreted):
    r = interpreted.get("model")
    assert r is not None and "error" not in r, r
    assert r["finite"] and r["rel_err"] < MODEL_TOL, r


def test_plugin_fused_method_matches_its_reference_method(interpreted):
    r = interpreted.get("plugin-methods")
    assert r is not None and "error" not in r, r
    for name in ("VlmptqReferenceMoEMethod", "VlmptqFusedMoEMethod"):
        assert r[name]["dtype"] == "torch.float16" and r[name]["rel_err"] < TOLERANCE, (name, r[name])
        assert r[name]["on_input_rel_err"] < TOLERANCE, (name, r[name])
        assert "one expert per token" in r[name]["on_input_top2"], (name, r[name])
    assert r["VlmptqFusedMoEMethod"]["params"] == ["w13_qweight", "w13_sz", "w2_qweight", "w2_sz"]
    assert "w13_weight_packed" in r["VlmptqReferenceMoEMethod"]["params"]



def test_benchmark_dry_run(tmp_path, monkeypatch):
    """benchmarks/moe_kernels.py --dry --tune: the GPU benchmark's flow on a tiny block (interpreter), its result
    file, and the tuner's file, which the plugin's lookup reads back under the two launches' ``moe-`` keys."""
    from vllm_plugin.kernels.triton import configs

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # the benchmark sets it itself for --dry
    p = subprocess.run([sys.executable, "benchmarks/moe_kernels.py", "--dry", "--bits", "4", "--tokens", "3", "--tune",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("moe-kernels-*.json")).read_text())
    assert {"gpu", "date", "commit", "command", "copy_bw_gbs", "records"} <= set(data)
    recs = {r["impl"]: r for r in data["records"]}
    assert set(recs) == {"vlmptq", "bf16", "vlmptq-tuned"} and all("error" not in r for r in recs.values()), recs
    tuned = recs.pop("vlmptq-tuned")
    assert tuned["rel_err"] < TOLERANCE and tuned["rows_per_expert"] == 1  # 6 routed rows: unsorted decode
    monkeypatch.setenv(configs.CONFIG_DIR_ENV, str(tmp_path / "tuned"))
    configs.load_table.cache_clear()
    try:  # gate/up: [2 x 128 interleaved rows, hidden 256]; down: [hidden 256, 128]
        for launch, (n, k) in (("gate_up", (256, 256)), ("down", (256, 128))):
            found = configs.tuned_config("dry-cpu", 4, 128, n, k, 1, prefix="moe-")
            assert found == configs.KernelConfig.from_dict(tuned["configs"][launch]), launch
    finally:
        configs.load_table.cache_clear()
    assert recs["vlmptq"]["rel_err"] < TOLERANCE and recs["bf16"]["rel_err"] < TOLERANCE
    assert recs["vlmptq"]["bits"] == 4 and recs["vlmptq"]["t_us"] > 0 and recs["vlmptq"]["experts_touched"] >= 2
    assert "| 3 | vlmptq | 4 |" in next(tmp_path.glob("moe-kernels-*.md")).read_text()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
