#!/usr/bin/env python3
"""How the solvers rank on synthetic layers with realistic structure, over many seeds.

For every seed a fresh layer (vlmptq.solvers.synthetic: outlier channels, vision/text tokens with
different statistics, X != X~) is quantized by each configuration; losses are reported relative to
GPTQ's on the same layer, on the calibration samples and on held-out samples of the same
distribution. Writes benchmarks/results/solver-orderings.{md,json}.

    python benchmarks/solver_orderings.py [--seeds 20] [--bits 2 3 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import result_header, write_results  # noqa: E402

from vlmptq.quant import WeightScheme  # noqa: E402
from vlmptq.solvers import SolverOptions, build_solver  # noqa: E402
from vlmptq.solvers.synthetic import make_synthetic_layer  # noqa: E402

O = SolverOptions
CONFIGS: dict[str, tuple[str, SolverOptions]] = {
    "rtn": ("rtn", O()),
    "gptq": ("gptq", O()),
    "gptaq a=0.25": ("gptaq", O(alpha=0.25)),
    "gptaq a=1": ("gptaq", O(alpha=1.0)),
    "gptaq+C a=0.25": ("vlmptq", O(alpha=0.25, correction="diag", modality=False)),
    "gptaq+C a=1": ("vlmptq", O(alpha=1.0, correction="diag", modality=False)),
    "gptaq+exact a=0.25": ("vlmptq", O(alpha=0.25, correction="exact", modality=False)),
    "gptaq+exact a=1": ("vlmptq", O(alpha=1.0, correction="exact", modality=False)),
    "gptaq+target a=1": ("vlmptq", O(alpha=1.0, correction="target", modality=False)),
    "M mu=0.5 a=0.25": ("vlmptq", O(alpha=0.25, correction="none", mu_grid=(0.5,))),
    "M searched a=0.25": ("vlmptq", O(alpha=0.25, correction="none")),
    "vlmptq (paper: M+C a=0.25)": ("vlmptq", O()),
    "vlmptq M+C a=1": ("vlmptq", O(alpha=1.0, correction="diag")),
    "vlmptq M+exact a=0.25": ("vlmptq", O(alpha=0.25, correction="exact")),
    "vlmptq M+exact a=1": ("vlmptq", O(alpha=1.0, correction="exact")),
    "vlmptq M+target a=1": ("vlmptq", O(alpha=1.0, correction="target")),
}


def run(seeds: int, bits_list: list[int], group: int, n: int, k: int) -> list[dict]:
    records = []
    jobs = [(b, s) for b in bits_list for s in range(seeds)]
    for bits, seed in tqdm(jobs, desc="layers"):
        full = make_synthetic_layer(n=n, k=k, samples=32, seed=seed)
        cal, held = full.split(16)
        stats = cal.statistics()
        scheme = WeightScheme(bits, group, False)
        for name, (method, opts) in CONFIGS.items():
            res = build_solver(method, opts).solve(cal.weight, stats, scheme, torch.float32)
            q = res.qweight.dequantize(torch.float32)
            records.append({
                "config": name, "method": method, "bits": bits, "group_size": group, "seed": seed,
                "loss_sym": cal.loss_sym(q), "loss_asym": cal.loss_asym(q),
                "heldout_asym": held.loss_asym(q), "mu_scores": res.info.get("mu_scores"),
            })
    return records


def summarize(records: list[dict], bits_list: list[int]) -> str:
    lines = []
    for bits in bits_list:
        rec = [r for r in records if r["bits"] == bits]
        base = {(r["seed"], key): r[key] for r in rec if r["config"] == "gptq" for key in ("loss_asym", "heldout_asym", "loss_sym")}
        lines += [f"\n### W{bits} g{rec[0]['group_size']} asym, {len({r['seed'] for r in rec})} seeds: loss / GPTQ's loss (mean [min, max])\n",
                  "| config | calib ||WX~-QX|| | held-out ||WX~-QX|| | calib ||WX-QX|| |", "|---|---|---|---|"]
        for name in CONFIGS:
            cells = []
            for key in ("loss_asym", "heldout_asym", "loss_sym"):
                v = [r[key] / base[(r["seed"], key)] for r in rec if r["config"] == name]
                cells.append(f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="layers (random seeds) per bit width")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="bit widths")
    ap.add_argument("--group-size", type=int, default=32, help="group size")
    ap.add_argument("--n", type=int, default=128, help="output features of the synthetic layer")
    ap.add_argument("--k", type=int, default=256, help="input features of the synthetic layer")
    ap.add_argument("--out", default="benchmarks/results/solver-orderings", help="output path stem")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (small layers run fastest on one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    records = run(args.seeds, args.bits, args.group_size, args.n, args.k)
    table = summarize(records, args.bits)
    header = result_header()
    print(table)
    write_results(args.out, header, records, "# Solver orderings on synthetic layers\n" + table)


if __name__ == "__main__":
    main()
