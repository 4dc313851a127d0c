"""Host memory of ``vlmptq quantize`` (or ``vlmptq compare``): the peak resident set size of the CLI process
(its own rusage from ``os.wait4``), beside the floor a run cannot go under (the model's weights, loaded
whole, in their dtype) and, with ``--baseline DIR``, the same commands run from another checkout (e.g. the
commit before a memory change) in the same run, on the same machine. Each run is a fresh process.

    python benchmarks/host_memory.py                            # SmolLM2-135M VLM proxy, RTN and GPTQ W3 g64
    python benchmarks/host_memory.py --baseline /tmp/wt-base    # also the checkout in /tmp/wt-base
    python benchmarks/host_memory.py --lazy-load                # also each method with --lazy-load
    python benchmarks/host_memory.py --compare --lazy-load      # `vlmptq compare` of an RTN W4 and a W3
                                                                # checkpoint (made first, by this checkout)

Writes ``benchmarks/results/host-memory-<date>.{md,json}`` (``host-memory-compare-<date>`` with --compare).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cli_runs import add_run_args, model_dir  # noqa: E402
from _results import REPO, result_header, tree_commit, write_results  # noqa: E402

logger = logging.getLogger("host_memory")


def run_cli(tree: Path, args: list[str], threads: int, command: str = "quantize") -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of ``python -m vlmptq COMMAND ARGS`` importing vlmptq from ``tree``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vlmptq", "-q", command, *args], env=env, cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"vlmptq {command} {' '.join(args)} (from {tree}) exited with {proc.returncode}:\n"
                           f"{err.decode(errors='replace')[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def _record(label: str, tree: Path, method: str, extra: list[str], seconds: float, peak: int, weights: int) -> dict:
    rec = {"tree": label, "commit": tree_commit(tree), "method": method, "flags": " ".join(extra),
           "seconds": round(seconds, 1), "peak_rss_mib": round(peak / 2**20, 1),
           "over_weights_mib": round((peak - weights) / 2**20, 1)}
    logger.info("%s", rec)
    return rec


def _compare_checkpoints(model: Path, work: Path, args: argparse.Namespace) -> list[Path]:
    """An RTN W4 and a W(--bits) checkpoint of ``model`` to compare with it (made by this checkout)."""
    out = []
    for bits in (4, args.bits):
        ckpt = work / f"compare-rtn-w{bits}"
        shutil.rmtree(ckpt, ignore_errors=True)
        run_cli(REPO, ["--model", str(model), "--out", str(ckpt), "--method", "rtn", "--bits", str(bits),
                       "--group-size", str(args.group_size), "--device", "cpu"], args.threads)
        out.append(ckpt)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "host-memory", num_samples=8)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to run the same commands from")
    p.add_argument("--lazy-load", action="store_true", help="also run each method with --lazy-load")
    p.add_argument("--compare", action="store_true",
                   help="measure `vlmptq compare` (source + an RTN W4 and a W3 checkpoint, --photos 2 --questions 1) "
                        "instead of quantize; --methods are ignored")
    args = p.parse_args(argv)
    if args.compare and args.out.name.startswith("host-memory-"):
        args.out = args.out.with_name(args.out.name.replace("host-memory-", "host-memory-compare-", 1))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = model_dir(args)
    from vlmptq.config import make_config
    from vlmptq.plan import plan

    quantized = plan(model, make_config(bits=args.bits, group_size=args.group_size)).quantized_params
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    work = args.work_dir.absolute()
    runs = [("this checkout", REPO, ["--no-lazy-load"])]  # (label, tree, extra CLI flags); whole, not auto
    runs += [("this checkout", REPO, ["--lazy-load"])] if args.lazy_load else []
    runs += [("baseline", args.baseline.absolute(), [])] if args.baseline else []
    records = []
    if args.compare:
        ckpts = _compare_checkpoints(model, work, args)
        for label, tree, extra in runs:
            cli = ["--model", str(model), *map(str, ckpts), "--photos", "2", "--questions", "1", "--device", "cpu",
                   *extra]
            records.append(_record(label, tree, "compare", extra, *run_cli(tree, cli, args.threads, "compare"),
                                   weights))
    for method in [] if args.compare else args.methods:
        for label, tree, extra in runs:
            out = work / f"{method}-{label.replace(' ', '-')}{''.join(extra)}"
            shutil.rmtree(out, ignore_errors=True)
            cli = ["--model", str(model), "--out", str(out), "--method", method, "--bits", str(args.bits),
                   "--group-size", str(args.group_size), "--num-samples", str(args.num_samples), "--device", "cpu",
                   *extra]
            seconds, peak = run_cli(tree, cli, args.threads)
            shutil.rmtree(out, ignore_errors=True)
            records.append(_record(label, tree, method, extra, seconds, peak, weights))

    scheme = (f"compare with RTN W4 and W{args.bits} g{args.group_size} checkpoints, 2 photos x 1 question"
              if args.compare else f"W{args.bits} g{args.group_size}, {args.num_samples} calibration samples")
    header = {**result_header(), "model": str(model), "threads": args.threads, "scheme": scheme,
              "weights_mib": round(weights / 2**20, 1), "quantized_params": quantized}
    what = "compare` of two checkpoints" if args.compare else "quantize`"
    codes = "" if args.compare else (f"; {quantized / 1e6:.1f} M quantized weights (1 byte each as unpacked uint8 "
                                     f"codes, {args.bits / 8:.3f} byte packed)")
    md = [f"# Host memory of `vlmptq {what} (peak RSS of the CLI process)", "",
          f"Floor: the model's weights, {weights / 2**20:.1f} MiB on disk (loaded whole){codes}.", "",
          "| method | tree | commit | flags | peak RSS MiB | over the weights MiB | seconds |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['tree']} | {r['commit']} | {r['flags']} | {r['peak_rss_mib']} | "
           f"{r['over_weights_mib']} | {r['seconds']} |" for r in records]
    print("\n".join(md))
    write_results(args.out, header, records, "\n".join(md))


if __name__ == "__main__":
    main()
