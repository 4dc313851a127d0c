"""Draw-to-draw spread of the quality benchmark: the same cells calibrated on several data draws.

One ``benchmarks/quality.py`` run calibrates every method on one draw of calibration data (text
windows for ppl, built-in image-text samples for kl; ``--calib-seed``). A gap between two methods
smaller than the spread between draws is noise. This reads several result files of quality.py (one
per draw, e.g. the committed ``quality.json`` as seed 0 and ``--calib-seed 1..3`` runs) and writes,
per model / metric / bit width, each method's value per draw, its mean and standard deviation, and
the paired comparison of every method against a reference method (default GPTAQ): the mean
difference, its spread and on how many draws the method was better. Writes md + json.

    python benchmarks/quality_draws.py benchmarks/results/quality.json /tmp/q-s1.json /tmp/q-s2.json \\
        --bits 4 --out benchmarks/results/quality-w4-draws
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import result_header, write_results  # noqa: E402
from quality_report import LABELS, METRIC_TITLE, ORDER  # noqa: E402

BASELINE = "baseline"


def _method_rank(method: str) -> tuple[int, str]:
    known = [*ORDER, *LABELS]
    return (known.index(method) if method in known else len(known), method)


def load_draws(paths: list[Path], bits: set[int] | None, methods: set[str] | None = None) -> list[dict]:
    """One record per (file's seed, model, metric, method, bits); a seed given twice for the same cell
    keeps the later file's value (so a re-run replaces, never double-counts)."""
    cells: dict[tuple, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        seed = int((data.get("sizes") or {}).get("calib_seed", 0))
        for r in data["records"]:
            if (r["method"] == BASELINE or (bits and r["bits"] not in bits) or r.get("lm_head_bits")
                    or (methods and r["method"] not in methods)):
                continue
            key = (r["model"], r["metric"], r["bits"], r["group_size"], r["method"], seed)
            cells[key] = {"model": r["model"], "metric": r["metric"], "bits": r["bits"],
                          "group_size": r["group_size"], "method": r["method"], "seed": seed,
                          "value": r["value"], "commit": r.get("commit"), "source": str(path)}
    return sorted(cells.values(), key=lambda c: (c["model"], c["metric"], -c["bits"], _method_rank(c["method"]), c["seed"]))


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(records: list[dict], reference: str) -> list[dict]:
    """Per cell and method: mean, sd, and the paired comparison with ``reference`` on the shared draws."""
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in records:
        cell = (r["model"], r["metric"], r["bits"], r["group_size"])
        groups.setdefault(cell, {}).setdefault(r["method"], {})[r["seed"]] = r["value"]
    out = []
    for (model, metric, bits, group), methods in groups.items():
        ref = methods.get(reference, {})
        for method, by_seed in methods.items():
            values = list(by_seed.values())
            row = {"model": model, "metric": metric, "bits": bits, "group_size": group, "method": method,
                   "draws": dict(sorted(by_seed.items())), "mean": statistics.fmean(values), "sd": _sd(values)}
            shared = sorted(set(by_seed) & set(ref))
            if method != reference and shared:
                rel = [by_seed[s] / ref[s] - 1 for s in shared]  # < 0: better than the reference
                row["vs_reference"] = {"reference": reference, "draws": len(shared),
                                       "better_on": sum(x < 0 for x in rel),
                                       "mean_rel_diff": statistics.fmean(rel), "sd_rel_diff": _sd(rel)}
            out.append(row)
    return out


def render(summary: list[dict], reference: str) -> str:
    lines = ["# Quality over several calibration draws", ""]  # write_results adds the header lines
    cells: dict[tuple, list[dict]] = {}
    for row in summary:
        cells.setdefault((row["model"], row["metric"], row["bits"], row["group_size"]), []).append(row)
    for (model, metric, bits, group), rows in cells.items():
        seeds = sorted({s for r in rows for s in r["draws"]})
        lines += [f"## {model}, W{bits} g{group}: {METRIC_TITLE.get(metric, metric)}", ""]
        lines.append("| method | " + " | ".join(f"draw {s}" for s in seeds)
                     + f" | mean +- sd | vs {reference} (paired, relative) |")
        lines.append("|---" * (len(seeds) + 3) + "|")
        for r in rows:
            vals = " | ".join(f"{r['draws'][s]:.4g}" if s in r["draws"] else "" for s in seeds)
            vs = r.get("vs_reference")
            cmp = (f"{100 * vs['mean_rel_diff']:+.1f}% +- {100 * vs['sd_rel_diff']:.1f}%, better on "
                   f"{vs['better_on']}/{vs['draws']}" if vs else "")
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | {vals} | {r['mean']:.4g} +- {r['sd']:.2g} "
                         f"| {cmp} |")
        lines.append("")
    lines += ["Draw 0 is the committed table's calibration data; draws 1.. are `quality.py --calib-seed N` "
              "(other text windows for ppl, other built-in samples, crops and prompts for kl). Evaluation "
              "data is the same for every draw. The relative difference is per draw, method / "
              f"{reference} - 1 (negative: lower, i.e. better, than {reference}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="quality.py result JSON files, one draw each")
    p.add_argument("--bits", type=int, nargs="*", help="only these bit widths")
    p.add_argument("--methods", nargs="*", help="only these methods (default: all in the files)")
    p.add_argument("--reference", default="gptaq", help="method every other one is compared with")
    p.add_argument("--out", required=True, help="output stem (writes <out>.md and <out>.json)")
    args = p.parse_args(argv)
    records = load_draws(args.results, set(args.bits or ()), set(args.methods or ()))
    if not records:
        sys.exit(f"no quantized records in {', '.join(map(str, args.results))} (check --bits)")
    summary = summarize(records, args.reference)
    header = result_header()
    write_results(args.out, header, records, render(summary, args.reference), {"summary": summary})


if __name__ == "__main__":
    main()
