"""Time and peak host memory of text calibration (``vlmptq.calib.text.load_text_calibration``) on a large
``.txt`` corpus, in a fresh process per checkout: this one and, with ``--baseline DIR``, another (e.g. the commit
before a change), in the same run on the same machine. Peak RSS is the child's own (``os.wait4``), imports and
tokenizer included.

The corpus is real English prose repeated to ``--mb`` megabytes: Python's own documentation topics
(``pydoc_data.topics``, 79 pages, 0.47 MB), each copy's paragraphs shuffled with a seed. Tokenizer: the SmolLM2-135M
VLM proxy's (the real SmolLM2 tokenizer).

    python benchmarks/text_calibration.py                            # 50 MB, 128 windows x 2048 tokens
    python benchmarks/text_calibration.py --baseline /tmp/wt-base    # also the checkout in /tmp/wt-base

Writes ``benchmarks/results/text-calibration-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import REPO, result_header, tree_commit, write_results  # noqa: E402

logger = logging.getLogger("text_calibration")

CHILD = """
import json, sys, time
from transformers import AutoTokenizer
from vlmptq.calib import CalibConfig
from vlmptq.calib.text import load_text_calibration
tok = AutoTokenizer.from_pretrained(sys.argv[1])
t0 = time.perf_counter()
samples = load_text_calibration(CalibConfig(source=sys.argv[2], num_samples=int(sys.argv[3]),
                                            max_seq_len=int(sys.argv[4])), tok)
print(json.dumps({"seconds": time.perf_counter() - t0, "samples": len(samples),
                  "tokens": sum(s.num_tokens for s in samples)}))
"""


def build_corpus(path: Path, megabytes: float, seed: int) -> int:
    """Python's documentation topics, paragraphs shuffled per copy, until ``megabytes``; returns the size."""
    from pydoc_data.topics import topics

    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    rng, size = random.Random(seed), 0
    with path.open("w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            rng.shuffle(paragraphs)
            chunk = "\n\n".join(paragraphs) + "\n\n"
            f.write(chunk)
            size += len(chunk.encode())
    return size


def run_child(tree: Path, tokenizer: Path, corpus: Path, num_samples: int, max_seq_len: int) -> dict:
    """The child's figures plus its peak RSS (bytes, its own rusage) and wall time, importing vlmptq from
    ``tree``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tokenizer), str(corpus), str(num_samples),
                                 str(max_seq_len)], env=env, cwd=tree, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"text calibration from {tree} exited with {proc.returncode}:\n"
                               f"{err.read().decode(errors='replace')[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss"] = usage.ru_maxrss * 1024
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=float, default=50.0, help="corpus size in megabytes")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus's paragraph order")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout, timed the same way")
    p.add_argument("--work-dir", type=Path, default=Path(".cache/vlmptq/text-calibration"))
    p.add_argument("--out", type=Path,
                   default=REPO / "benchmarks/results" / f"text-calibration-{_dt.date.today().isoformat()}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from vlmptq.proxy import proxy_dir

    tokenizer = proxy_dir("smollm2-135m")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    corpus = (args.work_dir / f"corpus-{args.mb:g}mb-seed{args.seed}.txt").resolve()  # children run in their tree
    size = corpus.stat().st_size if corpus.is_file() else build_corpus(corpus, args.mb, args.seed)
    trees = [("this checkout", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    records = []
    for label, tree in trees:
        logger.info("%s (%s): %d x %d tokens from %.1f MB", label, tree, args.num_samples, args.max_seq_len,
                    size / 1e6)
        r = run_child(tree, tokenizer, corpus, args.num_samples, args.max_seq_len)
        records.append({"tree": label, "commit": tree_commit(tree), "corpus_mb": round(size / 1e6, 1),
                        "num_samples": r["samples"], "tokens": r["tokens"], "seconds": round(r["seconds"], 2),
                        "wall_seconds": round(r["wall_s"], 1), "peak_rss_mib": round(r["peak_rss"] / 2**20, 1)})
    lines = ["# Text calibration of a large .txt corpus (load_text_calibration)", "",
             "| tree | commit | corpus MB | windows | tokens | calibration s | process wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tree']} | {r['commit']} | {r['corpus_mb']} | {r['num_samples']} | {r['tokens']} | "
              f"{r['seconds']} | {r['wall_seconds']} | {r['peak_rss_mib']} |" for r in records]
    lines += ["", f"Tokenizer: {tokenizer.name} (SmolLM2); corpus: Python's documentation topics repeated, "
              "paragraphs shuffled per copy; one OpenMP thread; each tree in a fresh process."]
    print("\n".join(lines))
    write_results(args.out, result_header(), records, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
