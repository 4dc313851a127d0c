#!/usr/bin/env python3
"""Solver loss and time on Qwen2.5-VL-7B layer shapes (synthetic weights and statistics).

For each layer (qkv 4608x3584, o 3584x3584, gate_up 37888x3584, down 3584x18944) and method
(rtn, gptq, gptaq, vlmptq, vlmptq-exact) it times the solver (statistics are given, as the pipeline
gives them) and reports the relative output error on the symmetric objective
tr(E H E^T) / tr(W H W^T) and the asymmetric one (its closed form, relative to the same denominator).
It also counts the kernels each solver's column loop launches per column (torch.profiler on the CPU,
the gptq.COLUMN_LOOP range, K=1024):
on a GPU that loop is launch-bound, so this count is the device-independent part of the time ratio.
Writes benchmarks/results/solvers-<device>-<date>.{json,md}.

    python benchmarks/solvers.py --device cuda            # the GPU run (H100/H200)
    python benchmarks/solvers.py --device cpu --layers qkv o
    python benchmarks/solvers.py --layers expert_gate expert_down    # Qwen3-VL-30B-A3B's experts
    python benchmarks/solvers.py --device cuda --profile --layers o down --methods gptq gptaq vlmptq
                                   # where each method's time goes (torch.profiler, host and device), no files
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import result_header, write_results  # noqa: E402

from vlmptq.quant import WeightScheme  # noqa: E402
from vlmptq.solvers import SolverOptions, build_solver, layer_loss  # noqa: E402
from vlmptq.solvers.synthetic import synthetic_statistics, synthetic_weight  # noqa: E402

LAYERS = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
# --lm-head-bits: the 7B vocabulary projection, and SmolLM2-135M's (a CPU-sized one; group 64: K = 576);
# opt-in (--layers lm_head / lm_head_smollm2)
HEAD = {"lm_head": (152064, 3584), "lm_head_smollm2": (49152, 576)}
# one routed expert of Qwen3-VL-30B-A3B (hidden 2048, expert intermediate 768; gate and up are solved apart, down
# once): a MoE layer solves 128 x 3 of them; opt-in (--layers expert_gate expert_down)
EXPERT = {"expert_gate": (768, 2048), "expert_down": (2048, 768)}
METHODS = {
    "rtn": ("rtn", SolverOptions()),
    "gptq": ("gptq", SolverOptions()),
    "gptaq": ("gptaq", SolverOptions()),
    "vlmptq": ("vlmptq", SolverOptions()),
    "vlmptq-exact": ("vlmptq", SolverOptions(correction="exact")),
}


# aten calls that launch no kernel (views, metadata, scalars)
NO_KERNEL = frozenset(
    "aten::" + op for op in (
        "select slice unsqueeze squeeze view _unsafe_view as_strided expand t transpose permute diagonal "
        "reshape alias detach empty empty_like lift_fresh item _local_scalar_dense resolve_conj "
        "resolve_neg result_type is_nonzero contiguous"
    ).split()
)


def loop_dispatch(name: str, n: int = 512, k: int = 1024, bits: int = 3, group_size: int = 128) -> dict:
    """Aten calls per column inside the solver's column loop (the ``COLUMN_LOOP`` profiler range) on
    the CPU: kernels (compute ops) and all calls. Run with min-max group grids: the clip search (and
    VLM-PTQ's mu search, outside the range anyway) is one fused Triton kernel on a GPU but many small
    torch ops on the CPU, which would blur a per-column count."""
    from torch.profiler import ProfilerActivity, profile

    from vlmptq.solvers.gptq import COLUMN_LOOP

    method, opts = METHODS[name]
    solver = build_solver(method, opts.model_copy(update={"clip_search": False}))
    torch.manual_seed(0)
    stats, w = synthetic_statistics(k), synthetic_weight(n, k)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        solver.solve(w, stats, WeightScheme(bits, group_size, False), torch.bfloat16)
    ops = [e for e in prof.events()
           if e.name.startswith("aten::") and e.cpu_parent is not None and e.cpu_parent.name == COLUMN_LOOP]
    if not ops:
        raise RuntimeError(f"the profiler saw no {COLUMN_LOOP!r} range: was it renamed in vlmptq/solvers/gptq.py?")
    kernels = sum(e.name not in NO_KERNEL for e in ops)
    return {"method": name, "N": n, "K": k, "kernels_per_column": kernels / k, "calls_per_column": len(ops) / k}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_table(avgs) -> str:
    """Host and device milliseconds inside the solvers' named profiler ranges (they nest: the clip searches
    of a dynamic grid, the A/P rows and the lazy updates run inside the column loop's range)."""
    from torch.autograd import DeviceType

    from vlmptq.quant.grid import CLIP_SEARCH
    from vlmptq.solvers.gptq import ASYM_ROWS, COLUMN_LOOP, FACTOR, LAZY_UPDATE
    from vlmptq.solvers.modality import MU_SCORES

    lines = ["| phase | calls | host ms | device ms |", "|---|---|---|---|"]
    for name in (FACTOR, CLIP_SEARCH, MU_SCORES, COLUMN_LOOP, ASYM_ROWS, LAZY_UPDATE):
        e = next((e for e in avgs if e.key == name and e.device_type == DeviceType.CPU), None)
        if e is not None:
            lines.append(f"| {name} | {e.count} | {e.cpu_time_total / 1e3:.1f} | {e.device_time_total / 1e3:.1f} |")
    return "\n".join(lines)


def profile_solves(args, device: torch.device, rows: int = 14) -> None:
    """Per layer and method, one warm solve under torch.profiler: wall time, the time the device was busy
    (the sum of its kernels; far below the wall time = the host's per-op overhead bounds the solver) and
    the ops that cost the most device and host time. Printed only (a diagnosis, not a result)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for layer in args.layers:
        n, k = (LAYERS | HEAD | EXPERT)[layer]
        stats, w = synthetic_statistics(k, device=device), synthetic_weight(n, k, device=device)
        for name in args.methods:
            method, opts = METHODS[name]
            solver = build_solver(method, opts)
            scheme = WeightScheme(args.bits[0], args.group_size, False)
            solver.solve(w, stats, scheme, torch.bfloat16)  # warm: Triton compiles, cuBLAS handles
            _sync(device)
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                solver.solve(w, stats, scheme, torch.bfloat16)
                _sync(device)
            wall = time.perf_counter() - t0
            avgs = prof.key_averages()
            # the kernels' own entries only (an aten op's entry repeats its kernels' time), as the table's
            # "Self CUDA time total"
            dev_us = sum(e.self_device_time_total for e in avgs if e.device_type == DeviceType.CUDA)
            print(f"\n### {layer} {n}x{k} W{args.bits[0]} {name}: wall {wall:.3f} s (profiled), device busy "
                  f"{dev_us / 1e6:.3f} s")
            print(phase_table(avgs))
            for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
                print(avgs.table(sort_by=key, row_limit=rows, max_name_column_width=48))
        del stats, w
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS | HEAD | EXPERT),
                    help="layers to run (the LM heads and MoE experts only when named)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods")
    ap.add_argument("--bits", type=int, nargs="+", default=[3], help="bit widths")
    ap.add_argument("--group-size", type=int, default=128, help="group size")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per case (the minimum is kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/solvers-<device>-<date>)")
    ap.add_argument("--profile", action="store_true",
                    help="print where each solve's time goes (torch.profiler: device and host) instead of timing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.profile:
        profile_solves(args, device)
        return
    header = result_header()
    records = []
    for layer in args.layers:
        n, k = (LAYERS | HEAD | EXPERT)[layer]
        stats = synthetic_statistics(k, device=device)
        w = synthetic_weight(n, k, device=device)
        ref = layer_loss(torch.zeros_like(w), w, stats.hessian).item()
        for bits in args.bits:
            scheme = WeightScheme(bits, args.group_size, False)
            for name in args.methods:
                method, opts = METHODS[name]
                solver = build_solver(method, opts)
                best, res = float("inf"), None
                for _ in range(args.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    res = solver.solve(w, stats, scheme, torch.bfloat16)
                    _sync(device)
                    best = min(best, time.perf_counter() - t0)
                q = res.qweight.dequantize(torch.float32).to(device)
                rec = {
                    "layer": layer, "N": n, "K": k, "method": name, "bits": bits, "group_size": args.group_size,
                    "loss_sym": layer_loss(w, q, stats.hessian).item() / ref,
                    "loss_asym": layer_loss(w, q, stats.hessian, stats.dxxt).item() / ref,
                    "seconds": best,
                }
                records.append(rec)
                logging.info("%-8s %-13s W%d  %8.3fs  sym %.5f  asym %.5f", layer, name, bits, best,
                             rec["loss_sym"], rec["loss_asym"])
                del q, res
        del stats, w
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shapes = "Qwen3-VL-30B-A3B expert" if set(args.layers) <= set(EXPERT) else "Qwen2.5-VL-7B"
    lines = [f"# Solver loss and time, {shapes} shapes, {header['machine']}\n",
             "| layer | N x K | bits | method | seconds | x GPTQ time | rel. error (sym) | rel. error (asym) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        base = next((x["seconds"] for x in records if x["layer"] == r["layer"] and x["bits"] == r["bits"]
                     and x["method"] == "gptq"), None)
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        lines.append(f"| {r['layer']} | {r['N']}x{r['K']} | {r['bits']} | {r['method']} | {r['seconds']:.2f} | "
                     f"{ratio} | {r['loss_sym']:.5f} | {r['loss_asym']:.5f} |")
    dispatch = [loop_dispatch(m) for m in METHODS if m != "rtn"]
    lines += ["", "Column loop, kernels launched per column (torch.profiler on the CPU, N=512, K=1024, W3 g128;",
              "on a GPU the loop is launch-bound; the per-layer clip/mu searches are excluded, one fused kernel",
              "each there):", "",
              "| method | kernels / column | x GPTQ | aten calls / column (incl. views) |", "|---|---|---|---|"]
    for r in dispatch:
        lines.append(f"| {r['method']} | {r['kernels_per_column']:.2f} | "
                     f"{r['kernels_per_column'] / dispatch[0]['kernels_per_column']:.2f} | {r['calls_per_column']:.1f} |")
    table = "\n".join(lines)
    print(table)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-")
    out = args.out or f"benchmarks/results/solvers-{tag}-{dt.date.today().isoformat()}"
    write_results(out, {"device": header["machine"], **header}, records, table, extra={"loop_dispatch": dispatch})


if __name__ == "__main__":
    main()
