#!/usr/bin/env python3
"""Static analysis of the Triton kernels for a GPU we do not have: compile for it here (sm_90 by default), read the SASS.

For each Qwen2.5-VL-7B decoder GEMM (the shapes of ``benchmarks/kernels.py``) x bits x M, the launch the
plugin would make (tuned config file for ``--gpu`` if present, else the default heuristic) is compiled
ahead of time (:mod:`vllm_plugin.kernels.triton.aot`: the real cubin, no GPU needed) and we report:

* registers per thread, spills (must be 0), shared memory;
* the main K loop's instructions per thread per iteration and the widths of its global loads
  (weights must stream as 128-bit ``LDG.E.128``);
* three lower bounds on the kernel's time on the architecture's reference cards (``CARDS``: sm_90
  H100/H200, 132 SMs at the 1.98 GHz boost clock; sm_80 A100, 108 SMs at 1.41 GHz; ...):
  **issue** -- every warp instruction of every loop iteration at one per scheduler per clock;
  **alu** -- the integer/logic instructions (LOP3, SHF, IADD3, PRMT, ISETP, ...) on their half-rate
  pipe; **fill** -- the busiest SM's share (at least ceil(programs / 132) programs) at that issue
  rate, which sees grids too small to fill the card; and the **memory** time of the bytes the
  kernel must move at the cards' nominal memory bandwidth.

A decode kernel can only reach the issue-5 speed targets if its bound stays well under the memory
time (real code issues at ~60-80% of the peak rate). The decoder-layer table sums, per GEMM, the
largest bound and states the best speed-up over bf16 it allows (per GEMM the larger of bound and
memory time; bf16 taken as purely memory-bound at the same bandwidth). These are
bounds from static code, not measurements: only ``benchmarks/kernels.py`` on the card times anything.

A second table does the same for Qwen2.5-VL-7B's LM head through the 8-bit kernel (``triton_w8``,
g128 / g64 / g32 / per-channel, M <= 64; ``--no-head`` skips it).

Compiles with whatever Triton Python imports; the GPU machine's is 3.6 (``.venv/triton-gpu``, see
``scripts/setup_sidecars.sh``): ``PYTHONPATH=.venv/triton-gpu python benchmarks/kernel_static.py``
reports what that card will run. The result's machine line names the version.

Writes ``benchmarks/results/kernels-static-sm<arch>-<date>.{json,md}``. ``--sweep`` adds a search over
launch configs (tile sizes, warps, pipeline depth) on o_proj at each ``--m``, ranked by the issue bound.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_static.py compiles real kernels: run it without TRITON_INTERPRET=1")

import kernels as kernel_bench  # noqa: E402  (benchmarks/kernels.py: shapes and goals; no GPU work at import)
from _results import result_header, write_results  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vllm_plugin.kernels.triton import aot  # noqa: E402
from vllm_plugin.kernels.triton.configs import (  # noqa: E402
    KernelConfig, default_dot_config, fit_smem, select_config,
)
from vllm_plugin.kernels.triton.layout import effective_group, padded_k  # noqa: E402
from vllm_plugin.kernels.triton.ops import PROGRAMS_PER_SM  # noqa: E402

logger = logging.getLogger("kernel_static")

# the shapes and goals of benchmarks/kernels.py (one Qwen2.5-VL-7B decoder layer): name -> (N, K, bias)
LAYERS = {name: (sum(parts), k, bias) for name, (parts, k, bias) in kernel_bench.LAYERS.items()}
TARGETS = kernel_bench.TARGETS


@dataclass(frozen=True)
class Card:
    """The reference cards of one architecture: SMs, max boost clock, nominal memory bandwidths."""

    sms: int
    clock_ghz: float
    mem_tbs: dict  # two cards of the architecture: name -> TB/s (the tables show both)
    tuned_name: str  # whose tuned config file (if any) decides the launches


CARDS = {
    90: Card(132, 1.98, {"H100": 3.35, "H200": 4.8}, "NVIDIA H100 80GB HBM3"),
    80: Card(108, 1.41, {"A100-40GB": 1.56, "A100-80GB": 2.04}, "NVIDIA A100-SXM4-80GB"),
    86: Card(72, 1.695, {"A10": 0.6, "RTX3090": 0.936}, "NVIDIA A10"),
    89: Card(142, 2.52, {"L40S": 0.864, "RTX4090": 1.008}, "NVIDIA L40S"),
}
GROUP = 128
ALU_OPS = {"LOP3", "SHF", "IADD3", "PRMT", "ISETP", "SEL", "LEA", "PLOP3", "FSEL", "VIADD", "SGXT", "BMSK",
           "LOP", "IABS", "IMNMX", "VIMNMX", "FMNMX"}


def moved_bytes(bits: int, n: int, k: int, m: int, bias: bool, shared_tiles: int, tile_elems: int) -> int:
    """Bytes a GEMM must move at least: packed weights, scale/zero words, x, y (+ the fp32 partial
    sums of tiles shared between programs: written once, read once)."""
    kp = padded_k(k, bits)
    weights = n * kp * bits // 8
    sz = n * (kp // effective_group(GROUP, k)) * 4
    act = 2 * m * (k + n) + (2 * n if bias else 0)
    return weights + sz + act + 2 * 4 * tile_elems * shared_tiles


def analyse(bits: int, n: int, k: int, m: int, cfg: KernelConfig, bias: bool, arch: int) -> dict:
    card = CARDS[arch]
    launch = aot.meta_launch(bits, n, k, m, cfg, bias, GROUP, arch=arch, sms=card.sms)
    compiled = aot.compile_launch(launch, arch)
    use = aot.resource_usage(compiled)
    if cfg.path == "dequant":  # prefill: dequantize + cuBLAS; the loop analysis does not apply
        return dict(path="dequant", cfg=cfg.to_dict(), registers=use.registers, spills=use.spills,
                    shared=use.dynamic_shared + use.static_shared)
    loop = aot.hot_loop(aot.sass(compiled))
    base = collections.Counter(op.split(".")[0] for op in loop)
    loads = collections.Counter(op for op in loop if op.startswith(("LDG.", "LDGSTS.")))
    gemv = cfg.path == "gemv"  # grid (N tiles, K splits), one layout block per iteration
    # main-loop iterations over all programs: tiles x K blocks
    iters = launch.grid[0] * (launch.arg("U") // 16) if gemv else launch.arg("iters")
    warps = launch.meta["num_warps"]
    warp_instr = iters * len(loop) * warps
    # the busiest SM holds at least ceil(programs / SMs) programs (pigeonhole; stream-K programs
    # differ by at most one iteration): a bound that sees a grid too small to fill the card
    programs = math.prod(launch.grid)
    fill_instr = math.ceil(programs / card.sms) * math.ceil(iters / programs) * len(loop) * warps
    alu_instr = iters * sum(c for op, c in base.items() if op in ALU_OPS) * warps
    rate = card.sms * card.clock_ghz * 1e3  # SM-clocks per microsecond
    # tiles shared between programs: none when the workspace is the output itself, else at most one
    # per program
    tiles = launch.grid[0] if gemv else launch.arg("n_tiles_n") * math.ceil(m / cfg.block_m)
    shared = 0 if launch.arg("ws_ptr") is launch.arg("out_ptr") else min(programs, tiles)
    tile_elems = cfg.block_n * min(m, cfg.block_m)
    weights_per_iter = aot.weights_per_iteration(launch)
    return dict(
        path=cfg.path, cfg=cfg.to_dict(), grid=list(launch.grid),
        registers=use.registers, spills=use.spills, shared=use.dynamic_shared + use.static_shared,
        loop_instr=len(loop), weights_per_thread_iter=weights_per_iter / (32 * warps),
        instr_per_weight=aot.instructions_per_weight(launch, loop),
        loads={op: c for op, c in sorted(loads.items())},
        mix={op: c for op, c in base.most_common(12)},
        issue_us=warp_instr / (4 * rate), alu_us=alu_instr / (2 * rate), programs=programs,
        fill_us=fill_instr / (4 * card.clock_ghz * 1e3),
        bytes=moved_bytes(bits, n, k, m, bias, shared, tile_elems),
    )


def default_launch(bits: int, n: int, k: int, m: int, arch: int) -> KernelConfig:
    return select_config(CARDS[arch].tuned_name, bits, effective_group(GROUP, k), n, k, m, arch)


def fmt_loads(loads: dict) -> str:
    """{'LDG.E.128': 6, 'LDGSTS.E.BYPASS.128': 3} -> '6x128 3x128(async)'."""
    def width(op: str) -> str:
        w = op.rsplit(".", 1)[-1]
        return (w if w.isdigit() else "32") + ("(async)" if op.startswith("LDGSTS") else "")
    return " ".join(f"{c}x{width(op)}" for op, c in loads.items())


def layer_table(records: list[dict], card: Card) -> list[str]:
    first, tbs = next(iter(card.mem_tbs.items()))
    lines = ["| layer | bits | M | path | config | regs | spills | loop instr | instr/weight | global loads (count x bits) "
             f"| programs | issue us | alu us | fill us | {first} mem us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        c = r["cfg"]
        short = f"bn{c['block_n']} bm{c['block_m']} w{c['num_warps']} s{c['num_stages']}"
        if r["path"] == "dequant":
            lines.append(f"| {r['layer']} | {r['bits']} | {r['M']} | dequant | bn{c['block_n']} w{c['num_warps']} "
                         f"| {r['registers']} | {r['spills']} | | | | | | | | |")
            continue
        mem = r["bytes"] / (tbs * 1e6)
        lines.append(f"| {r['layer']} | {r['bits']} | {r['M']} | {r['path']} | {short} | {r['registers']} "
                     f"| {r['spills']} | {r['loop_instr']} | {r['instr_per_weight']:.2f} | "
                     f"{fmt_loads(r['loads'])} | {r['programs']} | {r['issue_us']:.1f} | {r['alu_us']:.1f} "
                     f"| {r['fill_us']:.1f} | {mem:.1f} |")
    return lines


def gemm_bound(r: dict) -> float:
    """Lower bound on one GEMM's time from its code: issue, ALU pipe or the busiest SM."""
    return max(r["issue_us"], r["alu_us"], r["fill_us"])


def decoder_sums(records: list[dict], card: Card) -> tuple[list[str], list[dict]]:
    """Sum over the 4 GEMMs per (bits, M): bounds and the best speed-up over bf16 each allows (per
    GEMM the larger of its code bound and its memory time, summed)."""
    a, b = card.mem_tbs
    lines = [f"| bits | M | issue us | alu us | bound us | {a} mem us | {b} mem us | bound / {a} mem "
             f"| {a} best x bf16 | {b} best x bf16 | target x bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sums = []
    keys = sorted({(r["bits"], r["M"]) for r in records if r["path"] != "dequant"})
    for bits, m in keys:
        rs = [r for r in records if (r["bits"], r["M"]) == (bits, m)]
        if len(rs) != len(LAYERS) or any(r["path"] == "dequant" for r in rs):
            continue
        issue, alu = sum(r["issue_us"] for r in rs), sum(r["alu_us"] for r in rs)
        bound = sum(gemm_bound(r) for r in rs)
        bf16 = sum(2 * (n * k + m * (k + n)) for n, k, _ in LAYERS.values())
        row = dict(bits=bits, M=m, issue_us=issue, alu_us=alu, bound_us=bound)
        for gpu, tbs in card.mem_tbs.items():
            row[f"{gpu}_mem_us"] = sum(r["bytes"] for r in rs) / (tbs * 1e6)
            best = sum(max(gemm_bound(r), r["bytes"] / (tbs * 1e6)) for r in rs)
            row[f"{gpu}_best_speedup"] = (bf16 / (tbs * 1e6)) / best
        sums.append(row)
        target = TARGETS.get(m, {}).get(bits)
        lines.append(f"| {bits} | {m} | {issue:.1f} | {alu:.1f} | {row['bound_us']:.1f} | {row[f'{a}_mem_us']:.1f} "
                     f"| {row[f'{b}_mem_us']:.1f} | {row['bound_us'] / row[f'{a}_mem_us']:.2f} "
                     f"| {row[f'{a}_best_speedup']:.2f} | {row[f'{b}_best_speedup']:.2f} "
                     f"| {target if target else '-'} |")
    return lines, sums


def sweep_configs(bits: int, m: int, arch: int) -> list[KernelConfig]:
    """MMA-kernel launch shapes worth comparing at M: tile width x warps x pipeline depth (the M tile
    follows M as in the default heuristic; shapes whose buffers do not fit shared memory are left out)."""
    bm = default_dot_config(bits, m, arch).block_m
    out = []
    for bn, warps, stages in itertools.product((64, 128, 256), (4, 8), (2, 3, 4)):
        cfg = KernelConfig("dot", block_n=bn, block_m=bm, num_warps=warps, num_stages=stages)
        if fit_smem(cfg, bits, arch) == cfg and bn * bm <= 256 * 64 * (warps // 4):
            out.append(cfg)
    return out


def run_sweep(bits_list: list[int], ms: list[int], arch: int) -> tuple[list[str], list[dict]]:
    n, k, bias = LAYERS["o"]
    recs = []
    jobs = [(b, m, c) for b in bits_list for m in ms if m <= 256 for c in sweep_configs(b, m, arch)]
    for bits, m, cfg in tqdm(jobs, desc="sweep (o_proj)"):
        r = analyse(bits, n, k, m, cfg, bias, arch)
        r["instr_per_weight_all_m"] = r["instr_per_weight"] * math.ceil(m / cfg.block_m)  # M tiles re-dequantize
        recs.append(dict(bits=bits, M=m, **r))
    lines = ["| bits | M | block_n | block_m | warps | stages | regs | spills | smem KiB | loop instr "
             "| instr/weight (x M tiles) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (r["bits"], r["M"], r["spills"], r["instr_per_weight_all_m"])):
        c = r["cfg"]
        lines.append(f"| {r['bits']} | {r['M']} | {c['block_n']} | {c['block_m']} | {c['num_warps']} | {c['num_stages']} "
                     f"| {r['registers']} | {r['spills']} | {r['shared'] / 1024:.0f} | {r['loop_instr']} "
                     f"| {r['instr_per_weight_all_m']:.2f} |")
    return lines, recs


# Qwen2.5-VL-7B's LM head (vocabulary x hidden) through the 8-bit kernel (triton_w8), per group size
HEAD = kernel_bench.HEAD
HEAD_GROUPS = (128, 64, 32, HEAD[1])


def analyse_w8(n: int, k: int, m: int, group: int, arch: int) -> dict:
    """The W8 launch ``plan_w8_launch`` makes (heuristic shape): registers, loop, issue bound vs the
    memory time of its bytes (codes, scale and zero point per group in bf16, x, y)."""
    import torch

    from vllm_plugin.kernels.triton_w8 import plan_w8_launch

    card = CARDS[arch]
    meta = dict(dtype=torch.bfloat16, device="meta")
    scale = torch.empty((n, k // group), **meta)
    launch, _ = plan_w8_launch(torch.empty((m, k), **meta), torch.empty((n, k // 4), dtype=torch.int32, device="meta"),
                               scale, torch.empty_like(scale), None, sms=card.sms, arch=arch)
    compiled = aot.compile_launch(launch, arch)
    use = aot.resource_usage(compiled)
    r = dict(N=n, K=k, M=m, group=group, kernel=launch.kernel.__name__, registers=use.registers, spills=use.spills,
             bytes=n * k + 4 * n * (k // group) + 2 * m * (k + n))
    if "dequant" in launch.kernel.__name__:
        return r
    loop = aot.hot_loop(aot.sass(compiled))
    bm, bn, bk, warps = (launch.meta[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"))
    programs = math.prod(launch.grid)
    iters = launch.grid[0] * launch.grid[1] * math.ceil(k / bk)  # K tiles of every output tile
    rate = card.sms * card.clock_ghz * 1e3
    r.update(cfg=f"bn{bn} bm{bm} bk{bk} w{warps} split{launch.grid[2]}", loop_instr=len(loop),
             instr_per_weight=len(loop) * warps * 32 / (bn * bk), programs=programs,
             issue_us=iters * len(loop) * warps / (4 * rate))
    return r


def head_table(arch: int, ms: list[int]) -> tuple[list[str], list[dict]]:
    card = CARDS[arch]
    a, b = card.mem_tbs
    n, k = HEAD
    recs = [analyse_w8(n, k, m, g, arch) for m in ms if m <= 64 for g in HEAD_GROUPS]
    lines = [f"| M | group | config | regs | spills | loop instr | instr/weight | issue us | {a} mem us "
             f"| {b} mem us | {a} best x bf16 | {b} best x bf16 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        g = "per-channel" if r["group"] == k else f"g{r['group']}"
        mems = {gpu: r["bytes"] / (tbs * 1e6) for gpu, tbs in card.mem_tbs.items()}
        best = {gpu: 2 * (n * k + r["M"] * (k + n)) / (tbs * 1e6) / max(r["issue_us"], mems[gpu])
                for gpu, tbs in card.mem_tbs.items()}
        r.update({f"{gpu}_best_speedup": v for gpu, v in best.items()})
        lines.append(f"| {r['M']} | {g} | {r['cfg']} | {r['registers']} | {r['spills']} | {r['loop_instr']} "
                     f"| {r['instr_per_weight']:.2f} | {r['issue_us']:.1f} | {mems[a]:.1f} | {mems[b]:.1f} "
                     f"| {best[a]:.2f} | {best[b]:.2f} |")
    return lines, recs


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=aot.H100_ARCH, choices=(80, 86, 89, 90),
                    help="compute capability x10 (90: H100/H200; the plugin needs >= 80)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], choices=(2, 3, 4))
    ap.add_argument("--m", type=positive_int, nargs="+", default=[1, 16, 64, 256], help="activation rows")
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    ap.add_argument("--sweep", action="store_true", help="also compare launch configs on o_proj at each --m")
    ap.add_argument("--no-head", action="store_true", help="skip the 8-bit LM head table")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args)
    except aot.AotUnavailable as e:
        sys.exit(f"cannot compile for sm_{args.arch} here: {e}")


def run(args: argparse.Namespace) -> None:
    records = []
    jobs = [(layer, bits, m) for bits in args.bits for m in args.m for layer in args.layers]
    for layer, bits, m in tqdm(jobs, desc=f"compile sm_{args.arch}"):
        n, k, bias = LAYERS[layer]
        cfg = default_launch(bits, n, k, m, args.arch)
        if cfg.path == "dot":  # what plan_launch will do to a tuned entry, so the table shows it
            cfg = fit_smem(cfg, bits, args.arch)
        records.append(dict(layer=layer, N=n, K=k, M=m, bits=bits, **analyse(bits, n, k, m, cfg, bias, args.arch)))
    card = CARDS[args.arch]
    sum_lines, sums = decoder_sums(records, card)
    bws = ", ".join(f"{name} {tbs} TB/s" for name, tbs in card.mem_tbs.items())
    md = [f"# Triton kernels, static analysis for sm_{args.arch} (compiled here, no GPU)", "",
          f"Bounds use {card.sms} SMs at {card.clock_ghz} GHz, {card.sms * PROGRAMS_PER_SM} persistent programs, "
          f"and nominal memory bandwidth ({bws}); bf16 is taken as memory-bound at the same bandwidth. "
          "These are static bounds, not timings.", "",
          "## One decoder layer (sum of the 4 GEMMs)", "", *sum_lines, "",
          "## Per GEMM", "", *layer_table(records, card)]
    extra = {"arch": args.arch, "sms": card.sms, "clock_ghz": card.clock_ghz, "mem_tbs": card.mem_tbs, "sums": sums,
             "triton": __import__("triton").__version__}
    if not args.no_head:
        head_lines, extra["head_w8"] = head_table(args.arch, args.m)
        md += ["", f"## LM head {HEAD[0]}x{HEAD[1]} at W8 (triton_w8, heuristic launches; the bf16 head is "
               "taken as memory-bound)", "", *head_lines]
    if args.sweep:
        sweep_lines, sweep = run_sweep(args.bits, args.m, args.arch)
        md += ["", "## Launch config sweep (o_proj 3584x3584)", "", *sweep_lines]
        extra["sweep"] = sweep
    print("\n".join(md))
    header = dict(result_header(),
                  machine=f"sm_{args.arch} (static, compiled on the CPU with Triton {extra['triton']})")
    stem = args.out / f"kernels-static-sm{args.arch}-{datetime.date.today().isoformat()}"
    write_results(stem, header, records, "\n".join(md), extra=extra)


if __name__ == "__main__":
    main()
