"""Markdown for benchmarks/quality.py: one table per model and metric, the ordering check, cost.

Also a command that merges result files of quality.py into one table (e.g. mixed-precision runs,
one per ``--override`` set, beside the uniform cells of the committed table):

    python benchmarks/quality_report.py benchmarks/results/quality.json /tmp/qmix/*.json \\
        --metrics kl --methods vlmptq --bits 2 3 --out benchmarks/results/quality-mixed-w2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ("rtn", "gptq", "gptaq", "vlmptq")  # the claimed ordering, worst to best
LABELS = {
    "vlmptq": "vlmptq (paper: diagonal C)",
    "vlmptq-exact": "vlmptq-exact (exact shift; beyond the paper)",
    "vlmptq-target": "vlmptq-target (least-squares target, alpha 1; beyond the paper)",
    "vlmptq-target-a025": "vlmptq-target-a025 (least-squares target, alpha 0.25; beyond the paper)",
    "vlmptq-sum": "vlmptq-sum (ablation: raw-sum modality diagonals)",
    "vlmptq-c-only": "vlmptq-c-only (ablation: correction C alone)",
    "vlmptq-m-only": "vlmptq-m-only (ablation: modality-aware parameters, searched mu, alone)",
}
METRIC_TITLE = {
    "ppl": "perplexity on held-out Wikipedia text (lower is better)",
    "kl": "mean KL(unquantized || quantized) per token, nats, image+text prompts on held-out photos "
          "(lower is better)",
}
NOTES = """\
What is measured:
- **Baseline** = the dequantized GGUF model in fp32 (SmolLM2-135M-Instruct from Q4_1, Gemma-3-270M
  from Q4_K_M): the packaged weights are already 4-bit, so every number is relative to that model,
  never to the original fp16/bf16 release. W4 uses group size 64 because SmolLM2's Q4_1 blocks of 32
  make 4-bit g32 trivially exact.
- **ppl**: the language model alone, text-only calibration on Wikipedia articles disjoint from the
  held-out ones (gensim's excerpt). Every token is a text token, so VLM-PTQ's modality split is
  degenerate there (its `mu` search only chooses between the Hessian-diagonal-weighted and the
  unweighted clip search).
- **kl**: the VLM proxy (`vlmptq/proxy.py`): the same real language model inside a VLM architecture
  (LLaVA for SmolLM2, Gemma 3 for Gemma-3-270M) with an **untrained** vision tower whose projector
  is scaled so vision embeddings have the RMS of real text embeddings. Calibrated through
  `vlmptq.quantize_in_memory` on the built-in image-caption set; evaluated on the held-out photos
  (`BUILTIN_HOLDOUT`) at every text position after the image. It exercises the modality-aware path
  on real language-model activations with real vision/text token proportions; it is **not** a
  model that understands images, so it says nothing about visual-question accuracy.
- `quant_seconds`: time inside the layer-by-layer pipeline (calibration capture + solving), one
  CPU thread; `peak_rss_mb`: peak resident memory of a fresh process that loaded the model and
  quantized it (model, calibration activations of both streams, solver). Timings from a shared
  2-core machine (two runs in parallel, other jobs beside them) vary by up to ~2x between runs of
  the same method; compare methods through their ratios across many cells, and see
  `benchmarks/solvers.py` for controlled solver timings.
"""


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if metric == "ppl" and v < 1e4 else (f"{v:.3g}" if metric == "ppl" else f"{v:.4f}")


def _ordering(cells: dict[tuple[str, int], float], bits: int) -> str:
    vals = [cells.get((m, bits)) for m in reversed(ORDER)]  # vlmptq, gptaq, gptq, rtn
    if any(v is None for v in vals):
        return f"W{bits}: incomplete"
    broken = [f"{a} {va:.4g} > {b} {vb:.4g}" for (a, va), (b, vb)
              in zip(zip(reversed(ORDER), vals), list(zip(reversed(ORDER), vals))[1:]) if va > vb]
    return f"W{bits}: " + ("holds" if not broken else "**fails**: " + "; ".join(broken))


def _method(rec: dict) -> str:
    """Row label: the method, plus the lm_head's bits when it was quantized too and the mixed-precision
    overrides (with the average code bits they give)."""
    head = rec.get("lm_head_bits")
    mixed = (f" + {', '.join(rec['overrides'])}" if rec.get("overrides") else "") + \
        (f" + --target-bits {rec['target_bits']:g}" if rec.get("target_bits") else "")
    mixed += f" ({rec['code_bits']} bits avg)" if mixed else ""
    return rec["method"] + (f" + lm_head W{head}" if head else "") + mixed


def render_markdown(records: list[dict], header: dict) -> str:
    lines = ["# Quality on real weights: RTN vs GPTQ vs GPTAQ vs VLM-PTQ", ""]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["metric"]), []).append(r)
    for (model, metric), recs in groups.items():
        bits = sorted({r["bits"] for r in recs if r["bits"] is not None}, reverse=True)
        gs = next((r["group_size"] for r in recs if r["group_size"]), None)
        methods = list(dict.fromkeys(_method(r) for r in recs))
        cells = {(_method(r), r["bits"]): r["value"] for r in recs}
        lines += [f"## {model}: {METRIC_TITLE[metric]}", ""]
        lines += ["| method | " + " | ".join(f"W{b} g{gs}" for b in bits) + " |",
                  "|---|" + "---|" * len(bits)]
        for m in methods:
            if m == "baseline":
                base = cells.get(("baseline", None))
                if metric == "ppl":
                    lines.append(f"| baseline (dequantized GGUF, fp32) | {_fmt(base, metric)} (all columns) |"
                                 + " |" * (len(bits) - 1))
                continue
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(_fmt(cells.get((m, b)), metric) for b in bits) + " |")
        lines.append("")
        if set(ORDER) <= set(methods):  # a run over a subset of the methods makes no ordering claim
            lines += ["Ordering VLM-PTQ <= GPTAQ <= GPTQ <= RTN: "
                      + "; ".join(_ordering(cells, b) for b in bits if b <= 3), ""]
        cost = [r for r in recs if r["quant_seconds"] is not None]
        if cost:
            lines += ["<details><summary>quantization time (s) / peak RSS (MB)</summary>", "",
                      "| method | " + " | ".join(f"W{b}" for b in bits) + " |", "|---|" + "---|" * len(bits)]
            by = {(_method(r), r["bits"]): r for r in cost}
            for m in methods:
                if m == "baseline":
                    continue
                row = [f"{by[m, b]['quant_seconds']:.0f} s / {by[m, b]['peak_rss_mb']:.0f} MB"
                       if (m, b) in by else "-" for b in bits]
                lines.append(f"| {m} | " + " | ".join(row) + " |")
            lines += ["", "</details>", ""]
    lines += ["## Notes", "", NOTES]
    sizes = header.get("sizes")
    if sizes:
        lines += [f"Sizes: {sizes}; torch threads per run: {header.get('threads')}.", ""]
    return "\n".join(lines)


def merge(paths: list[Path], metrics: set[str] | None, methods: set[str] | None, bits: set[int] | None) -> list[dict]:
    """The records of several quality.py result files (each run once, by its key), filtered."""
    out: dict[str, dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["records"]:
            if ((metrics and r["metric"] not in metrics) or (methods and r["method"] not in methods)
                    or (bits and r["bits"] not in bits)):
                continue
            out.setdefault(r["run"], {**r, "source": str(path)})
    return list(out.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="quality.py result files (.json)")
    p.add_argument("--metrics", nargs="+", choices=sorted(METRIC_TITLE), help="keep these metrics (default: all)")
    p.add_argument("--methods", nargs="+", help="keep these methods (default: all)")
    p.add_argument("--bits", nargs="+", type=int, help="keep these (base) bit widths (default: all)")
    p.add_argument("--out", type=Path, required=True, help="output stem: writes <out>.md and <out>.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import result_header, write_results

    records = merge(args.results, set(args.metrics or ()), set(args.methods or ()), set(args.bits or ()))
    header = result_header()
    write_results(args.out, header, records, render_markdown(records, header))


if __name__ == "__main__":
    main()
