"""Shared bookkeeping for benchmark results: machine, date, commit and command, written as JSON + markdown."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import shlex
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        import os

        return f"CPU {cpu}, {os.cpu_count()} cores"
    except Exception:  # pragma: no cover
        return f"CPU {cpu}"


def result_header() -> dict:
    return {
        "machine": machine(),
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def write_results(stem: str | Path, header: dict, records: list[dict], markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` ({**header, "records": [...]}) and ``<stem>.md`` (header lines + markdown)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    js = stem.with_suffix(".json")
    md = stem.with_suffix(".md")
    js.write_text(json.dumps({**header, "records": records}, indent=1) + "\n")
    meta = "\n".join(f"- {k}: `{v}`" for k, v in header.items())
    md.write_text(f"{markdown.strip().splitlines()[0]}\n\n{meta}\n" + "\n".join(markdown.strip().splitlines()[1:]) + "\n")
    logger.info("wrote %s and %s", js, md)
    return js, md
