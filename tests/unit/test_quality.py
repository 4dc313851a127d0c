"""The quality benchmark's pieces: result format, ordering check, data split, and a --quick smoke run
of ``benchmarks/quality.py`` on a tiny random model (real tokenizer, real text and photos)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from quality_report import main as report_main, render_markdown  # noqa: E402

RECORD_KEYS = {"model", "method", "bits", "group_size", "metric", "value", "quant_seconds", "peak_rss_mb"}


def _rec(method, bits, value, metric="ppl"):
    return {"model": "m", "method": method, "bits": bits, "group_size": None if bits is None else 64,
            "metric": metric, "value": value, "quant_seconds": None if bits is None else 1.0,
            "peak_rss_mb": None if bits is None else 100.0}


def test_report_checks_the_ordering_per_bit_width():
    recs = [_rec("baseline", None, 10.0)]
    for bits, vals in {3: (20, 15, 14, 13), 2: (90, 40, 45, 30)}.items():
        recs += [_rec(m, bits, v) for m, v in zip(("rtn", "gptq", "gptaq", "vlmptq"), vals)]
    md = render_markdown(recs, {})
    assert "W3: holds" in md
    assert "W2: **fails**: gptaq 45 > gptq 40" in md
    assert "| baseline (dequantized GGUF, fp32) | 10.00" in md
    assert "| gptaq | 14.00 | 45.00 |" in md
    assert "| vlmptq (paper: diagonal C) | 13.00 | 30.00 |" in md


def test_report_merges_result_files_and_labels_mixed_precision(tmp_path):
    uniform = [{**_rec("vlmptq", b, v, "kl"), "run": f"u{b}"} for b, v in ((3, 0.4), (2, 1.4))]
    mixed = {**_rec("vlmptq", 2, 0.9, "kl"), "run": "m2", "overrides": ["down_proj$=4"], "code_bits": 2.5}
    (tmp_path / "a.json").write_text(json.dumps({"records": [*uniform, {**_rec("gptq", 2, 2.0, "kl"), "run": "g"}]}))
    (tmp_path / "b.json").write_text(json.dumps({"records": [mixed, uniform[1]]}))  # u2 again: counted once
    report_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--methods", "vlmptq", "--out",
                 str(tmp_path / "merged")])
    data = json.loads((tmp_path / "merged.json").read_text())
    assert sorted(r["run"] for r in data["records"]) == ["m2", "u2", "u3"]
    md = (tmp_path / "merged.md").read_text()
    assert "| vlmptq (paper: diagonal C) | 0.4000 | 1.4000 |" in md
    assert "| vlmptq + down_proj$=4 (2.5 bits avg) | - | 0.9000 |" in md


def test_calibration_and_held_out_articles_are_disjoint():
    pytest.importorskip("gensim")
    from quality_data import articles, split_articles

    calib, held = split_articles()
    assert len(calib) >= 40 and len(held) >= 40
    assert not set(calib) & set(held)
    assert sum(len(t) for _, t in articles()) > 2_500_000  # the excerpt is ~3.1 M characters
    assert all("'''" not in t for t in calib[:5])  # wiki bold markup removed


@pytest.mark.slow
def test_quick_smoke_run_on_a_tiny_model(tmp_path):
    """Every method at W2 on the tiny model: text perplexity and proxy KL, written as md + json."""
    import quality

    out = tmp_path / "quality"
    quality.main(["--quick", "--tiny", "--bits", "2", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    data = json.loads(out.with_suffix(".json").read_text())
    assert {"date", "commit", "command", "machine", "records"} <= set(data)
    recs = data["records"]
    assert all(RECORD_KEYS <= set(r) for r in recs)
    methods = {(r["metric"], r["method"]) for r in recs if r["bits"] == 2}
    assert methods == {(t, m) for t in ("ppl", "kl") for m in quality.METHODS}
    for r in recs:
        assert r["value"] == r["value"] and r["value"] >= 0  # finite, not NaN
        if r["method"] != "baseline":
            assert r["quant_seconds"] > 0 and r["peak_rss_mb"] > 0
    kl = {r["method"]: r["value"] for r in recs if r["metric"] == "kl" and r["bits"] == 2}
    assert all(v > 0 for v in kl.values())  # quantization changed the model
    md = out.with_suffix(".md").read_text()
    assert "## tiny: perplexity" in md and "## tiny-vlm-proxy: mean KL" in md


def test_a_calibration_seed_reaches_every_quantized_run_but_no_baseline():
    """--calib-seed redraws the text windows (ppl) and the built-in image-text samples (kl); the
    baselines, and seed 0's cache keys (the committed tables'), stay as they were."""
    import quality

    seeded = quality.Sizes(calib_seed=2)
    runs = quality.plan(["m"], ["ppl", "kl"], [4], 64, ["gptaq", "vlmptq"], seeded)
    assert {r.task for r in runs} == {"ppl", "kl"}
    for r in runs:
        assert r.sizes.calib_seed == (0 if r.method == quality.BASELINE else 2), r
    zero = {r.method: r.key() for r in quality.plan(["m"], ["kl"], [4], 64, ["vlmptq"], quality.Sizes())}
    kl = {r.method: r.key() for r in runs if r.task == "kl"}
    assert kl[quality.BASELINE] == zero[quality.BASELINE]  # one reference for every draw
    assert kl["vlmptq"] != zero["vlmptq"]  # a redrawn run never reuses seed 0's cached result


def test_draws_table_pairs_each_method_with_the_reference_per_draw(tmp_path):
    """quality_draws.py: values per draw, mean / sd, and the paired relative difference against GPTAQ
    (negative = better); a draw given twice keeps the later file's value."""
    import quality_draws

    def result(seed, values, name):
        recs = [_rec("baseline", None, 10.0)] + [_rec(m, 4, v) for m, v in values.items()]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"sizes": {"calib_seed": seed}, "records": recs}))
        return path

    files = [result(0, {"gptaq": 10.0, "vlmptq": 11.0}, "s0"), result(1, {"gptaq": 10.0, "vlmptq": 9.0}, "s1"),
             result(2, {"gptaq": 20.0, "vlmptq": 99.0}, "s2-old"), result(2, {"gptaq": 20.0, "vlmptq": 18.0}, "s2")]
    out = tmp_path / "draws"
    quality_draws.main([*map(str, files), "--bits", "4", "--out", str(out)])
    summary = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["summary"]}
    assert summary["vlmptq"]["draws"] == {"0": 11.0, "1": 9.0, "2": 18.0}
    vs = summary["vlmptq"]["vs_reference"]
    assert vs["draws"] == 3 and vs["better_on"] == 2
    assert vs["mean_rel_diff"] == pytest.approx((0.1 - 0.1 - 0.1) / 3)
    assert "vs_reference" not in summary["gptaq"]
    md = out.with_suffix(".md").read_text()
    assert "| vlmptq (paper: diagonal C) | 11 | 9 | 18 |" in md and "better on 2/3" in md
