"""Shared by the benchmarks that run whole ``vlmptq quantize`` CLI processes (``resume.py``,
``host_memory.py``): their common options and the default model (the SmolLM2-135M VLM proxy)."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_run_args(p: argparse.ArgumentParser, stem: str, *, num_samples: int) -> None:
    """--model, --bits, --group-size, --num-samples, --threads, --work-dir and --out (``results/<stem>-<date>``)."""
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the SmolLM2-135M VLM proxy)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=num_samples)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--work-dir", type=Path, default=Path(f".cache/vlmptq/{stem}"))
    p.add_argument("--out", type=Path, default=RESULTS / f"{stem}-{_dt.date.today().isoformat()}",
                   help="output stem: <out>.md and <out>.json")


def model_dir(args: argparse.Namespace) -> Path:
    """``--model``, or the SmolLM2-135M VLM proxy (built once from the installed real weights)."""
    if args.model is not None:
        return args.model.absolute()
    from vlmptq.proxy import proxy_dir

    return proxy_dir("smollm2-135m")
