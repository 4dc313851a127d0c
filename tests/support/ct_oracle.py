"""The compressed-tensors >= 0.18 oracle for dense 3-bit packing (scripts/setup_sidecars.sh)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ORACLE_VERSION = "0.20.0"


def oracle_env() -> dict[str, str]:
    """Environment for a subprocess importing compressed-tensors 0.20 from scripts/setup_sidecars.sh's
    folder (it shadows the venv's 0.17 through PYTHONPATH); skips the test if it is not installed."""
    d = Path(os.environ.get("CT_ORACLE_DIR") or Path(sys.prefix) / "ct-oracle")
    if not (d / f"compressed_tensors-{ORACLE_VERSION}.dist-info").is_dir():
        pytest.skip(
            f"compressed-tensors {ORACLE_VERSION} oracle not installed at {d}; run "
            f"`bash scripts/setup_sidecars.sh` (needs PyPI once) to check dense 3-bit against it"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(d)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
