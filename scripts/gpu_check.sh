#!/usr/bin/env bash
# The one command a session with a GPU runs: checks and times the Triton kernels in < 8 minutes.
#
#   device tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Needs the wheels in .whl/ (git-ignored). Fetch them here first (on a machine with PyPI access):
#   bash scripts/gpu_check.sh --download-wheels
# (humming-kernels==0.1.19, nvidia-cuda-cccl==13.0.85, nvidia-cuda-crt==13.0.88 -- Humming's
#  NVRTC build needs the CCCL and crt headers; everything else it imports is in the GPU image.)
#
# Phases, each time-boxed and in its own process (a GPU fault in one cannot take the others down):
#   1. install the carried wheels into /tmp/site                                    (~10 s)
#   2. pytest tests/gpu (kernel correctness, NaN-poisoned outputs, torch.compile + CUDA graph; the quantizer
#      and `compare` with --device cuda beside the same runs on the CPU, resume across devices)  <= 140 s
#   3. benchmarks/kernels.py --tune: ours vs bf16 vs Humming on the Qwen2.5-VL-7B layer, M in
#      {1,16,64,256}, bits 3/2/4 (g128 asym); then a decode config search; then sym/g32/g64; then
#      the LM head (152064 x 3584) at W8 (triton_w8) and W4 beside bf16, then a W8 launch search <= 300 s
#   4. summary (printed last, so it is in the tool's output tail)
# Everything lands in $OUT (<= 8 files): gpu_check.log, pytest.log, kernels-<gpu>-<date>.{json,md},
# tuned/<gpu>.json. Afterwards, here: copy the json/md into benchmarks/results/ and, if the numbers
# are good, tuned/<gpu>.json into vllm_plugin/kernels/configs/, and commit.
# Knobs: PHASES="tests,bench" (default both), BENCH_ARGS="..." (extra benchmark flags).
# Second call, if device time remains (~2-3 min):  PHASES=solvers bash scripts/gpu_check.sh
#   5. benchmarks/solvers.py --device cuda: each method's loss and time on Qwen2.5-VL-7B layer
#      shapes (issue: VLM-PTQ <= 1.15x GPTQ's time on the GPU) -> $OUT/solvers-<gpu>-<date>.{json,md}, and on
#      a Qwen3-VL-30B-A3B expert's shapes -> $OUT/solvers-moe-<gpu>-<date>.{json,md}
# Then, if time remains (~4 min):  PHASES=moe bash scripts/gpu_check.sh
#   6. pytest tests/gpu/test_triton_moe_cuda.py (the fused MoE kernel against the reference, SiLU and tanh-GELU
#      gating, CUDA graphs; MOE_TEST_TIMEOUT, default 180 s) and
#      benchmarks/moe_kernels.py (a Qwen3-VL-30B-A3B MoE block, W4/W3/W2 vs bf16 grouped GEMM, T in
#      {1,16,64,256}) -> $OUT/moe-pytest.log, $OUT/moe-kernels-<gpu>-<date>.{json,md}
#      MOE_ARGS="--tune --tune-budget 250" MOE_TIMEOUT=290 adds the MoE launch search (the budget counts from the
#      benchmark's start; T's past it keep their defaults) -> $OUT/tuned/<gpu>.json (moe- keys; merge it into
#      vllm_plugin/kernels/configs/<gpu>.json here: the benchmark's --install does that where it runs)
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="humming-kernels==0.1.19 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88"
# The solver benchmark's options are pydantic models (not in the GPU image).
WHEELS="$WHEELS pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5"
# tests/gpu/test_pipeline_cuda.py writes real checkpoints: the quantization_config comes from compressed-tensors.
WHEELS="$WHEELS compressed-tensors==0.17.0 loguru==0.7.3"
if [[ "${1:-}" == "--download-wheels" ]]; then
    mkdir -p .whl
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
fi

OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
PHASES="${PHASES:-tests,bench}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=/tmp/triton_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
export HUMMING_CACHE_DIR=/tmp/humming_cache HUMMING_TMP_DIR=/tmp/humming_tmp
export VLMPTQ_COMMIT="${VLMPTQ_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

echo "$(el) === environment"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | head -3
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"

echo "$(el) === wheels"
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && echo "installed: $(ls .whl | tr '\n' ' ')" || echo "WARNING: wheel install failed; Humming will be skipped"
else
    echo "WARNING: no .whl/ folder (carry=[\".whl\"] and run --download-wheels first); Humming will be skipped"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# pytest-xdist workers (at most 12) when the image has xdist
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n $(( $(nproc) > 12 ? 12 : $(nproc) ))"

TEST_RC="not run"
if [[ ",$PHASES," == *",tests,"* ]]; then
    echo "$(el) === pytest tests/gpu"
    timeout -k 5 140 python3 -m pytest tests/gpu -q -ra --tb=short -p no:cacheprovider --confcutdir=tests/gpu \
        --ignore=tests/gpu/test_triton_moe_cuda.py $XDIST --maxfail=25 > "$OUT/pytest.log" 2>&1
    TEST_RC=$?
    tail -n 40 "$OUT/pytest.log"
    echo "$(el) pytest exit code $TEST_RC (124 = timed out)"
fi

BENCH_RC="not run"
if [[ ",$PHASES," == *",bench,"* ]]; then
    echo "$(el) === benchmarks/kernels.py"
    timeout -k 10 310 python3 benchmarks/kernels.py --tune --tune-ms 1,16 --out "$OUT" \
        --budget 150 --tune-budget 245 --quick-budget 255 --head-budget 265 --head-tune-budget 288 --hard 300 ${BENCH_ARGS:-}
    BENCH_RC=$?
    echo "$(el) benchmark exit code $BENCH_RC"
fi

SOLVERS_RC="not run"
if [[ ",$PHASES," == *",solvers,"* ]]; then
    echo "$(el) === benchmarks/solvers.py"
    timeout -k 10 400 python3 benchmarks/solvers.py --device cuda --repeats 2 \
        --out "$OUT/solvers-$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "-"))')-$(date +%F)"
    SOLVERS_RC=$?
    # one Qwen3-VL-30B-A3B routed expert (docs/moe.md: 384 of them per MoE layer), seconds on a GPU
    timeout -k 10 120 python3 benchmarks/solvers.py --device cuda --repeats 3 --layers expert_gate expert_down \
        --out "$OUT/solvers-moe-$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "-"))')-$(date +%F)" \
        || SOLVERS_RC="$SOLVERS_RC, experts: $?"
    echo "$(el) solver benchmark exit code $SOLVERS_RC"
fi

MOE_RC="not run"
if [[ ",$PHASES," == *",moe,"* ]]; then
    echo "$(el) === fused MoE: pytest tests/gpu/test_triton_moe_cuda.py, benchmarks/moe_kernels.py"
    timeout -k 5 "${MOE_TEST_TIMEOUT:-180}" python3 -m pytest tests/gpu/test_triton_moe_cuda.py -q -ra --tb=short \
        -p no:cacheprovider --confcutdir=tests/gpu $XDIST --maxfail=10 > "$OUT/moe-pytest.log" 2>&1
    MOE_RC="tests $?"
    tail -n 25 "$OUT/moe-pytest.log"
    timeout -k 10 "${MOE_TIMEOUT:-150}" python3 benchmarks/moe_kernels.py --out "$OUT" ${MOE_ARGS:-}
    MOE_RC="$MOE_RC, benchmark $?"
    echo "$(el) fused MoE exit codes: $MOE_RC"
fi

echo
echo "==================================== GPU CHECK SUMMARY ($(el)) ===================================="
echo "gpu: $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)  commit: $VLMPTQ_COMMIT"
echo "pytest tests/gpu: exit $TEST_RC    benchmark: exit $BENCH_RC    solvers: exit $SOLVERS_RC    moe: $MOE_RC"
MD=$(ls -t "$OUT"/kernels-*.md 2>/dev/null | head -1)
if [[ -n "$MD" ]]; then
    echo "decoder-layer sums (from $(basename "$MD")):"
    awk '/^\| M \| bits/{p=1} p&&/^$/{exit} p' "$MD"
fi
MOEMD=$(ls -t "$OUT"/moe-kernels-*.md 2>/dev/null | head -1)
if [[ -n "$MOEMD" ]]; then
    echo "fused MoE block (from $(basename "$MOEMD")):"
    awk '/^\| T \|/{p=1} p' "$MOEMD"
fi
ls "$OUT"/tuned/*.json 2>/dev/null | sed 's/^/tuned configs: /'
echo "files in \$OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
