"""Tests that run their cases in a subprocess (the Triton interpreter must be switched on before triton is
imported; compile-only drivers replace the active one): the worker prints one ``CASE {json}`` line per case, the
parent test reads them back by name."""

from __future__ import annotations

import json
from collections.abc import Callable


def emit(name: str, run: Callable[[], dict], unavailable: tuple[type[Exception], ...] = ()) -> None:
    """Print ``run()``'s result dict as a case line; an exception becomes that case's ``error`` (one of
    ``unavailable``: its ``unavailable`` reason, which the parent test skips on)."""
    try:
        res = run()
    except unavailable as e:
        res = {"name": name, "unavailable": str(e)}
    except Exception as e:  # reported per case by the parent test
        res = {"name": name, "error": f"{type(e).__name__}: {e}"}
    print("CASE " + json.dumps(res), flush=True)


def parse_cases(stdout: str) -> dict[str, dict]:
    """The worker's case lines, by name."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("CASE "):
            r = json.loads(line[5:])
            out[r["name"]] = r
    return out
