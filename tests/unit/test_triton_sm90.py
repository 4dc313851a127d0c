"""The Triton kernels compile for sm_90 (H100/H200) on this CPU machine, and their SASS stays lean
(plus sm_80 / sm_86 / sm_89 launches: the Ampere and Ada defaults must not spill).

What the interpreter tests cannot see: a kernel that fails to lower (the packed-FMA inline PTX is only
compiled here), spills registers, loads weights in pieces smaller than 128 bits, or grows its loop. Each case compiles the launch the plugin would
make (``vllm_plugin.kernels.triton.aot``: Triton's own LLVM and ptxas, a compile-only driver) and checks
the cubin. The instruction ceilings are the sm_90 counts of 2026-11-28 plus ~10%
(``benchmarks/kernel_static.py`` prints the full table); raising one needs a measured reason.

Every case compiles twice, with the venv's Triton (3.9, torch 2.13's) and with the GPU machine's
(3.6, SPEC section 6; ``scripts/setup_sidecars.sh`` puts it in ``.venv/triton-gpu``): the GPU runs
3.6's code, and the same source can compile differently (3.6 spilled an sm_80 tile and issued 20% more
instructions in the 8-bit head's decode loop than 3.9 before both were fixed). Each compiler's compiles
run in one subprocess (no ``TRITON_INTERPRET`` there; ~40 s on one core with a cold cache) that prints one JSON line per
case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.case_worker import emit, parse_cases

REPO = Path(__file__).resolve().parents[2]
# compiler -> folder put first on the worker's PYTHONPATH (None: the venv's own Triton)
COMPILERS = {"venv": None, "gpu-image": Path(os.environ.get("TRITON_GPU_DIR") or Path(sys.prefix) / "triton-gpu")}

# name, bits, group, N, K, M, bias, dtype, config (None: the default for the shape), max instr/weight
CASES = [
    # 2.43 (Triton 3.9; 3.6: 2.37); 2.55 if the per-chunk scale FFMA splits into FMUL + FADD (no fusion)
    ("dot-w2-m1-default", 2, 128, 3584, 3584, 1, False, "bfloat16", None, 2.5),
    ("dot-w3-m1-default", 3, 128, 3584, 3584, 1, False, "bfloat16", None, 3.5),
    ("dot-w4-m1-default", 4, 128, 3584, 3584, 1, False, "bfloat16", None, 3.25),
    ("dot-w3-m1-g32-raggedK-bias-fp16", 3, 32, 4608, 3000, 1, True, "float16", None, None),
    ("dot-w4-m1-g64-split", 4, 64, 3584, 18944, 1, False, "bfloat16",
     dict(path="dot", block_n=64, block_m=16, num_warps=4, num_stages=4, programs=500), None),
    ("dot-w3-m16-default", 3, 128, 3584, 3584, 16, False, "bfloat16", None, 3.5),
    ("dot-w4-m64-default-scaled", 4, 128, 4608, 3584, 64, True, "bfloat16", None, 5.0),
    ("dot-w3-m256-default-scaled", 3, 128, 3584, 3584, 256, False, "bfloat16", None, 3.85),
    ("dot-w3-perchannel-m16", 3, 3584, 3584, 3584, 16, False, "float16", None, None),
    # stream-K with one workspace slot (264 tiles x 2 blocks over 264 programs, no tile shared): the output
    # stands in for the workspace, whose unused reduction branch must still type-check (it did not: found on
    # an H200 with the 7B LM head at M = 256, every config fell back to dequantize + cuBLAS)
    ("dot-w4-m1-one-slot", 4, 128, 33792, 256, 1, False, "bfloat16", None, None),
    ("dequant-w2-m300", 2, 64, 3584, 3584, 300, False, "bfloat16", None, None),
    # the CUDA-core decode path (a tuner candidate at M = 1): no shared memory in the loop, 3.9 / 4.2 / 5.7
    # instructions per weight (Triton 3.6, 2026-11-29) -- more than the MMA loop's, bought back only if it
    # issues faster (no barriers, 12-20 warps per SM); the GPU decides. W3's three planes need 8 warps for
    # 128 rows (4 spill under Triton 3.9)
    ("gemv-w4-m1", 4, 128, 37888, 3584, 1, False, "bfloat16",
     dict(path="gemv", block_n=256, num_warps=4, num_stages=3), 4.3),
    ("gemv-w2-m1", 2, 128, 37888, 3584, 1, False, "bfloat16",
     dict(path="gemv", block_n=128, num_warps=4, num_stages=3), 4.6),
    ("gemv-w3-m1", 3, 128, 37888, 3584, 1, False, "bfloat16",
     dict(path="gemv", block_n=128, num_warps=8, num_stages=3), 6.2),
    ("gemv-w3-g32-raggedK-bias-fp16", 3, 32, 4608, 3000, 1, True, "float16",
     dict(path="gemv", block_n=64, num_warps=8, num_stages=3), None),  # 16 groups per block: half the rows
    # Ampere (mma.sync, 163 KiB of shared memory): the sm_8x defaults compile without spills
    ("sm80-dot-w3-m1-default", 3, 128, 3584, 3584, 1, False, "bfloat16", None, None),
    ("sm80-dot-w2-m256-default", 2, 128, 3584, 3584, 256, False, "float16", None, None),
    ("sm80-dot-w4-m256-default", 4, 128, 3584, 3584, 256, False, "bfloat16", None, None),
    # Ada / GA10x (99 KiB of shared memory, 1536 threads per SM; ptxas budgets registers differently)
    ("sm89-dot-w2-m256-default", 2, 128, 3584, 3584, 256, False, "bfloat16", None, None),
    ("sm86-dot-w3-m64-default", 3, 128, 3584, 3584, 64, False, "bfloat16", None, None),
    # the 8-bit kernel (triton_w8: an 8-bit lm_head), heuristic launches: Qwen2.5-VL-7B's head at decode
    ("w8-dot-m1-head", 8, 128, 152064, 3584, 1, False, "bfloat16", None, 4.9),  # 4.34 (Triton 3.9), 4.46 (3.6)
    ("w8-dot-m1-head-g64", 8, 64, 152064, 3584, 1, False, "bfloat16", None, 5.3),  # 4.62, 4.81: K tile 64
    ("w8-dot-m1-head-g32", 8, 32, 152064, 3584, 1, False, "bfloat16", None, 7.2),  # 6.53, 6.55: 4 groups / tile
    ("w8-dot-m48-g32-bias-fp16", 8, 32, 4608, 3584, 48, True, "float16", None, None),
    ("w8-dot-perchannel-m16", 8, 3584, 3584, 3584, 16, False, "bfloat16", None, None),
    ("w8-dot-g96-m4", 8, 96, 4608, 3456, 4, False, "bfloat16", None, None),  # per-column scale lookup
    ("w8-dequant-m300", 8, 128, 3584, 3584, 300, False, "bfloat16", None, None),
    # sm_8x's own 64-row tile (128 x 64, 8 warps): 10.8 / 10.9 (sm_80, Triton 3.6 / 3.9); sm_90's takes 17 there
    ("sm80-w8-dot-m64-head", 8, 128, 152064, 3584, 64, False, "bfloat16", None, 12.0),
    ("sm80-w8-dot-m64-head-g32", 8, 32, 152064, 3584, 64, False, "bfloat16", None, 12.5),  # 11.2; spilled before
]

# the fused MoE path's grouped launches (vllm_plugin/kernels/triton/moe.py) with their default tiles, on
# Qwen3-VL-30B-A3B's experts (128 x [1536 x 2048] gate/up, [2048 x 768] down): name, bits, group, N, K, routed
# rows (decode: one token, 8 experts; prefill: 4096 tokens), the down launch (else gate/up with its SiLU-and-
# multiply epilogue), dtype, max instr/weight
MOE_CASES = [
    ("moe-w4-gate_up-decode", 4, 128, 1536, 2048, 8, False, "bfloat16", None),
    ("moe-w3-down-decode", 3, 128, 2048, 768, 8, True, "bfloat16", None),
    ("moe-w2-gate_up-decode-fp16", 2, 64, 1536, 2048, 8, False, "float16", None),
    ("moe-w3-gate_up-prefill", 3, 128, 1536, 2048, 32768, False, "bfloat16", None),
    ("moe-w4-down-prefill-g32", 4, 32, 2048, 768, 32768, True, "bfloat16", None),
    ("moe-align", None, None, None, None, 256, None, None, None),  # the one-program alignment of 256 routed rows
]


# the quantizer's own kernels on Qwen2.5-VL-7B shapes (vlmptq: the clip search, the fused GPTQ column loop): name,
# kind, rows N, columns K (search) / block width (loop), group, weightings M, basis rows B (mixtures when M != B)
SOLVER_CASES = [
    ("solver-search-dynamic-g128", "search", 3584, 128, 128, 1, 1),  # GPTQ's per-group search at a group's start
    ("solver-search-mu-g128", "search", 1792, 3584, 128, 7, 2),  # VLM-PTQ's mu grid over the scored rows
    ("solver-search-mu-g32", "search", 1792, 3584, 32, 7, 2),
    ("solver-search-m7-g64", "search", 1024, 3584, 64, 7, 7),  # seven weightings given whole
    ("solver-loop-gptq", "loop", 3584, 128, 128, 1, 1),
    ("solver-loop-gptaq", "loop", 3584, 128, 128, 2, 2),
    ("solver-loop-vlmptq", "loop", 3584, 128, 128, 3, 3),  # GPTAQ + the diagonal correction's factor
    ("solver-loop-vlmptq-32rows", "loop", 3584, 128, 128, 3, 3),  # the programs of a GPU 64 rows would not fill
]


def _solver_compile(aot, name, kind, n, k, group, m, b):
    import torch

    meta = dict(dtype=torch.float32, device="meta")
    if kind == "search":
        from vlmptq.quant.search_triton import plan_search

        mix = torch.empty(m, b, **meta) if m != b else None
        launch, _, _ = plan_search(torch.empty(n, k, **meta), 7, False, group, torch.empty(b, k, **meta),
                                   torch.bfloat16, 100, 0.8, 2.0, mix)
    else:
        from vlmptq.solvers.column_loop_triton import plan_segment

        coef = torch.empty(k, k, 2, **meta) if m > 1 else torch.empty(k, k, **meta)
        launch = plan_segment(torch.empty(k, 2, n, **meta), torch.empty(k, n, **meta), coef,
                              torch.empty(n, **meta), torch.empty(n, **meta),
                              torch.empty(k, n, **meta) if m == 3 else None, 0, group, 7.0,
                              32 if name.endswith("32rows") else None)
    use = aot.resource_usage(aot.compile_launch(launch, aot.H100_ARCH))
    return {"name": name, "path": "solver", "registers": use.registers, "spills": use.spills,
            "shared": use.dynamic_shared + use.static_shared}


def _moe_compile(aot, name, bits, group, n, k, rows, down, dtype):
    import torch

    from vllm_plugin.kernels.triton.moe import moe_config, sorts

    sort = sorts(rows, 128, 8)  # decode (8 rows): unsorted, one block per routed row
    cfg = moe_config("meta", bits, group, n, k, -(-rows // 128) if sort else 1)
    launch = aot.meta_moe_launch(bits, n, k, 128, rows, cfg, group, getattr(torch, dtype), down, sort)
    compiled = aot.compile_launch(launch, aot.H100_ARCH)
    use = aot.resource_usage(compiled)
    loop = aot.hot_loop(aot.sass(compiled))
    return {"name": name, "path": "dot", "registers": use.registers, "spills": use.spills,
            "shared": use.dynamic_shared + use.static_shared, "loop": len(loop),
            "instr_per_weight": aot.instructions_per_weight(launch, loop),
            "loads": sorted({op for op in loop if op.startswith(("LDG.", "LDGSTS."))})}


def _moe_align_compile(aot):
    import torch

    from vllm_plugin.kernels.triton.moe import plan_align_launch

    launch, _ = plan_align_launch(torch.empty((32, 8), dtype=torch.int32, device="meta"), 128, 16)
    use = aot.resource_usage(aot.compile_launch(launch, aot.H100_ARCH))
    return {"name": "moe-align", "path": "align", "registers": use.registers, "spills": use.spills,
            "shared": use.dynamic_shared + use.static_shared}


def _w8_compile(aot, name, group, n, k, m, bias, dtype, arch):
    import torch

    from vllm_plugin.kernels.triton_w8 import plan_w8_launch

    meta = dict(dtype=dtype, device="meta")
    x = torch.empty((m, k), **meta)
    q = torch.empty((n, k // 4), dtype=torch.int32, device="meta")
    s = torch.empty((n, k // group), **meta)
    launch, _ = plan_w8_launch(x, q, s, torch.empty_like(s), torch.empty((n,), **meta) if bias else None, sms=132,
                               arch=arch)
    compiled = aot.compile_launch(launch, arch)
    use = aot.resource_usage(compiled)
    path = "dequant" if "dequant" in launch.kernel.__name__ else "dot"
    res = {"name": name, "path": path, "registers": use.registers, "spills": use.spills,
           "shared": use.dynamic_shared + use.static_shared, "grid": list(launch.grid)}
    if path == "dot":
        loop = aot.hot_loop(aot.sass(compiled))
        res["loop"] = len(loop)
        res["instr_per_weight"] = len(loop) * launch.meta["num_warps"] * 32 / (
            launch.meta["BLOCK_N"] * launch.meta["BLOCK_K"])
        res["loads"] = sorted({op for op in loop if op.startswith(("LDG.", "LDGSTS."))})
    return res


def _worker() -> None:
    import torch

    from vllm_plugin.kernels.triton import aot
    from vllm_plugin.kernels.triton.configs import KernelConfig, default_config, default_dot_config

    import triton

    print("CASE " + json.dumps({"name": "triton", "version": triton.__version__}), flush=True)
    for name, bits, group, n, k, m, bias, dtype, cfg, _ in CASES:
        arch = int(name[2:4]) if name.startswith("sm") else aot.H100_ARCH
        try:
            if bits == 8:
                print("CASE " + json.dumps(_w8_compile(aot, name, group, n, k, m, bias, getattr(torch, dtype), arch)),
                      flush=True)
                continue
            # "dot-...-default": the MMA loop's default tiles (M = 1 itself defaults to the gemv path on sm_90)
            cfg = KernelConfig(**cfg) if cfg else (default_dot_config if "dot" in name else default_config)(
                bits, m, arch)
            launch = aot.meta_launch(bits, n, k, m, cfg, bias, group, getattr(torch, dtype), arch)
            compiled = aot.compile_launch(launch, arch)
            use = aot.resource_usage(compiled)
            res = {"name": name, "path": cfg.path, "registers": use.registers, "spills": use.spills,
                   "shared": use.dynamic_shared + use.static_shared}
            if cfg.path != "dequant":
                loop = aot.hot_loop(aot.sass(compiled))
                res["loop"] = len(loop)
                res["instr_per_weight"] = aot.instructions_per_weight(launch, loop)
                res["loads"] = sorted({op for op in loop if op.startswith(("LDG.", "LDGSTS."))})
        except aot.AotUnavailable as e:
            res = {"name": name, "unavailable": str(e)}
        except Exception as e:  # reported per case by the test
            res = {"name": name, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print("CASE " + json.dumps(res), flush=True)
    for name, *case, _ in MOE_CASES:
        emit(name, lambda: _moe_align_compile(aot) if name == "moe-align" else _moe_compile(aot, name, *case),
             (aot.AotUnavailable,))
    for name, *case in SOLVER_CASES:
        emit(name, lambda: _solver_compile(aot, name, *case), (aot.AotUnavailable,))


@pytest.fixture(scope="module", params=list(COMPILERS))
def compiled(request):
    sidecar = COMPILERS[request.param]
    if sidecar is not None and not (sidecar / "triton" / "__init__.py").is_file():
        pytest.skip(f"no Triton in {sidecar}: run `bash scripts/setup_sidecars.sh` (needs PyPI once) to compile "
                    f"with the GPU image's Triton 3.6 too")
    # fusion off by default (Triton >= 3.10's default): the launches ask for it themselves
    path = os.pathsep.join(str(p) for p in (sidecar, REPO) if p is not None)
    env = dict(os.environ, PYTHONPATH=path, TRITON_DEFAULT_FP_FUSION="0", TRITON_CACHE_DIR=str(
        Path(os.environ.get("TMPDIR") or "/tmp") / f"triton-aot-{request.param}"))
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, __file__, "--worker"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    cases = parse_cases(p.stdout)
    assert cases, f"compile worker printed nothing (rc {p.returncode}):\n{p.stderr[-3000:]}"
    version = cases.pop("triton", {}).get("version")
    if sidecar is not None:
        assert version == "3.6.0", f"the worker imported Triton {version}, not the GPU image's 3.6.0"
    return cases


@pytest.mark.parametrize("case", CASES + MOE_CASES + SOLVER_CASES, ids=lambda c: c[0])
def test_compiles_for_sm90_without_spills(compiled, case):
    r = compiled.get(case[0])
    assert r is not None, f"no result for {case[0]}"
    if "unavailable" in r:
        pytest.skip(r["unavailable"])
    assert "error" not in r, r["error"]
    assert not r["spills"], f"{case[0]} spills registers ({r['registers']} used)"
    if r["path"] in ("dequant", "align", "solver"):
        return
    assert r["loop"] > 0, "no main loop found in the SASS"
    weight_loads = {"LDG.E.128", "LDGSTS.E.BYPASS.128", "LDGSTS.E.128"}
    assert weight_loads & set(r["loads"]), f"weights are not loaded as 128-bit vectors: {r['loads']}"
    ceiling = case[-1]
    if ceiling is not None:
        assert r["instr_per_weight"] <= ceiling, (
            f"{case[0]}: {r['instr_per_weight']:.2f} SASS instructions per weight in the decode loop "
            f"(ceiling {ceiling}); see benchmarks/kernel_static.py")


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
