#!/usr/bin/env python3
"""What TF32 does to the solvers' results, emulated on the CPU.

On CUDA the solvers run their per-layer ``K^3``-sized products in TF32 (:mod:`vlmptq.solvers.precision`:
GPTAQ's ``A``/``P`` rows, the P term's share of the lazy block updates, VLM-PTQ's ``mu`` scores). This
script runs every solve twice on the CPU, once in fp32 and once with each of those products' operands
rounded to TF32's 10 mantissa bits (round to nearest even; fp32 accumulation, as tensor cores do), on
synthetic layers with realistic structure (vlmptq.solvers.synthetic), and reports how the asymmetric
loss ``||W X~ - Q X||^2`` moves, how many codes differ and whether the searched ``mu`` changes.
Writes benchmarks/results/solver-tf32.{md,json}.

    python benchmarks/solver_tf32.py [--seeds 10] [--bits 2 3 4]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import result_header, write_results  # noqa: E402

from vlmptq.quant import WeightScheme  # noqa: E402
from vlmptq.solvers import SolverOptions, build_solver  # noqa: E402
from vlmptq.solvers.synthetic import make_synthetic_layer  # noqa: E402

CONFIGS = {
    "gptaq a=0.25": ("gptaq", SolverOptions()),
    "vlmptq (paper: M+C a=0.25)": ("vlmptq", SolverOptions()),
    "vlmptq M+C a=1": ("vlmptq", SolverOptions(alpha=1.0)),
}


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32 (10 explicit mantissa bits, nearest even); other dtypes unchanged."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        return t
    b = t.contiguous().view(torch.int32)
    b = (b + 0xFFF + ((b >> 13) & 1)) & -0x2000
    return b.view(torch.float32).view(t.shape)


class EmulatedTF32(TorchFunctionMode):
    """Rounds the two factors of every matmul (not an addmm's accumulator) to TF32."""

    PRODUCTS = {torch.mm, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.matmul}
    ADD_PRODUCTS = {torch.addmm, torch.Tensor.addmm, torch.Tensor.addmm_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS:
            args = (to_tf32(args[0]), to_tf32(args[1]), *args[2:])
        elif func in self.ADD_PRODUCTS:
            args = (args[0], to_tf32(args[1]), to_tf32(args[2]), *args[3:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_tf32_products():
    """Every ``tf32_products`` block of the solvers emulates TF32 on the CPU: each vlmptq module that imported
    the context manager gets the emulating one (so a new user of it is covered without editing this)."""
    from vlmptq.solvers import precision

    users = [name for name, mod in list(sys.modules.items())
             if name.startswith("vlmptq.") and mod is not precision
             and getattr(mod, "tf32_products", None) is precision.tf32_products]
    if not users:
        raise RuntimeError("no vlmptq module uses vlmptq.solvers.precision.tf32_products: nothing to emulate")
    with contextlib.ExitStack() as stack:
        for name in users:
            stack.enter_context(mock.patch(f"{name}.tf32_products", lambda device: EmulatedTF32()))
        yield


def run(seeds: int, bits_list: list[int], group: int, n: int, k: int) -> list[dict]:
    records = []
    for bits, seed in tqdm([(b, s) for b in bits_list for s in range(seeds)], desc="layers"):
        layer = make_synthetic_layer(n=n, k=k, samples=16, seed=seed)
        stats = layer.statistics()
        scheme = WeightScheme(bits, group, False)
        for name, (method, opts) in CONFIGS.items():
            solver = build_solver(method, opts)
            fp32 = solver.solve(layer.weight, stats, scheme, torch.float32)
            with emulated_tf32_products():
                tf32 = solver.solve(layer.weight, stats, scheme, torch.float32)
            l32 = layer.loss_asym(fp32.qweight.dequantize(torch.float32))
            ltf = layer.loss_asym(tf32.qweight.dequantize(torch.float32))
            records.append({
                "config": name, "bits": bits, "seed": seed, "loss_fp32": l32, "loss_tf32": ltf,
                "rel_change": ltf / l32 - 1.0,
                "codes_differ": (fp32.qweight.codes != tf32.qweight.codes).float().mean().item(),
                "mu_fp32": fp32.info.get("mu"), "mu_tf32": tf32.info.get("mu"),
            })
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n", type=int, default=256, help="output features of the synthetic layers")
    ap.add_argument("--k", type=int, default=512, help="input features of the synthetic layers")
    ap.add_argument("--out", default="benchmarks/results/solver-tf32")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    header = result_header()
    records = run(args.seeds, args.bits, args.group_size, args.n, args.k)
    lines = [f"# TF32 products vs fp32 (emulated on the CPU), {args.seeds} synthetic {args.n}x{args.k} layers per "
             f"bit width, group {args.group_size}\n",
             "Asymmetric loss with TF32 relative to fp32 (mean, most negative, most positive), codes that differ, "
             "layers whose searched mu differs.\n",
             "| config | bits | loss change mean | min | max | codes differ (mean) | mu changed |",
             "|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        for bits in args.bits:
            rs = [r for r in records if r["config"] == name and r["bits"] == bits]
            ch = [r["rel_change"] for r in rs]
            mu = sum(r["mu_fp32"] != r["mu_tf32"] for r in rs) if rs[0]["mu_fp32"] is not None else "-"
            lines.append(f"| {name} | {bits} | {statistics.mean(ch):+.3%} | {min(ch):+.3%} | {max(ch):+.3%} | "
                         f"{statistics.mean(r['codes_differ'] for r in rs):.2%} | {mu} of {len(rs)} |")
    table = "\n".join(lines)
    print(table)
    write_results(args.out, header, records, table)


if __name__ == "__main__":
    main()
