#!/usr/bin/env bash
# The one command a session with a GPU runs: checks and times everything in one device call (< 9.5 minutes).
#
#   device tool:  run(command="VLMPTQ_COMMIT=<git rev-parse --short HEAD> bash scripts/gpu_check.sh", carry=[".whl"],
#                     timeout_s=600)
#
# Needs the wheels in .whl/ (git-ignored). Fetch them here first (on a machine with PyPI access):
#   bash scripts/gpu_check.sh --download-wheels
# (humming-kernels==0.1.19, nvidia-cuda-cccl==13.0.85, nvidia-cuda-crt==13.0.88 -- Humming's
#  NVRTC build needs the CCCL and crt headers; pydantic for the solver options, compressed-tensors for the
#  quantizer tests; everything else is in the GPU image.)
#
# Phases (PHASES, default "tests,bench,solvers"), each time-boxed and in its own process (a GPU fault in one
# cannot take the others down); DEADLINE (default 570 s) caps the whole run: a phase gets its box or what the
# deadline leaves after the later phases' reserves, whichever is less.
#   tests    pytest tests/gpu (kernel correctness, NaN-poisoned outputs, torch.compile + CUDA graph; the
#            quantizer and `compare` with --device cuda beside the same runs on the CPU, resume across devices),
#            one line per test as it finishes (-v), so a cut-off run still names its failures  <= 240 s
#   bench    benchmarks/kernels.py --tune: ours vs bf16 vs Humming on the Qwen2.5-VL-7B layer, M in
#            {1,16,64,256}, bits 3/2/4 (g128 asym); then a launch search at each M; then sym/g32/g64; then
#            the LM head at W8 and W4 beside bf16, then a W8 launch search (first H200 run: 88 s)      <= 300 s
#   solvers  benchmarks/solvers.py --device cuda: each method's loss and time on the 7B layers (issue: VLM-PTQ
#            <= 1.15x GPTQ's time on the GPU; first H200 run: 140 s)                                   <= 180 s
# Other phases, for a second call while the machine is warm (it is given back after 30 s idle):
#   profile  Nsight Compute on benchmarks/kernel_profile.py (ours at M=1 on qkv / gate_up, W4 / W2, the gemv
#            path, beside cuBLAS bf16: speed of light, occupancy, warp stalls, memory) -> $OUT/ncu.txt; and
#            benchmarks/solvers.py --profile (where GPTQ / GPTAQ / VLM-PTQ spend their time on o and down,
#            host vs device) -> $OUT/solvers-profile.txt                                              ~2-3 min
#   solvers-moe  benchmarks/solvers.py on a Qwen3-VL-30B-A3B expert's shapes -> solvers-moe-<gpu>-<date>  ~1 min
#   moe      pytest tests/gpu/test_triton_moe_cuda.py (the fused MoE kernel against the reference, SiLU and
#            tanh-GELU gating, CUDA graphs; MOE_TEST_TIMEOUT, default 180 s) and benchmarks/moe_kernels.py (a
#            Qwen3-VL-30B-A3B MoE block, W4/W3/W2 vs bf16 grouped GEMM, T in {1,16,64,256}) -> moe-pytest.log,
#            moe-kernels-<gpu>-<date>.{json,md}; MOE_ARGS="--tune --tune-budget 250" MOE_TIMEOUT=290 adds the MoE
#            launch search -> tuned/<gpu>.json (moe- keys; merge into vllm_plugin/kernels/configs/<gpu>.json)
# Everything lands in $OUT (the device tool brings back at most 8 files: the default phases write 7 --
# gpu_check.log, pytest.log, kernels-<gpu>-<date>.{json,md}, tuned/<gpu>.json, solvers-<gpu>-<date>.{json,md}).
# Afterwards, here: copy the json/md into benchmarks/results/ and, if the numbers are good, tuned/<gpu>.json
# into vllm_plugin/kernels/configs/, and commit.
# Knobs: PHASES, DEADLINE, TESTS (test paths, default tests/gpu), TESTS_TIMEOUT, BENCH_ARGS="..." (extra
# benchmark flags; later flags win, e.g. --hard 100), NCU_CASES.
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
PHASES="${PHASES:-tests,bench,solvers}"
DEADLINE="${DEADLINE:-570}"
has() { [[ ",$PHASES," == *",$1,"* ]]; }
# box SECONDS RESERVE: the phase's time box, cut to what the deadline leaves after RESERVE seconds for the
# phases still to come (at least 30 s, so a phase always starts)
box() { local left=$(( DEADLINE - ($(date +%s) - T0) - $2 )); (( left < $1 )) && echo $(( left > 30 ? left : 30 )) || echo "$1"; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=/tmp/triton_cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
export HUMMING_CACHE_DIR=/tmp/humming_cache HUMMING_TMP_DIR=/tmp/humming_tmp
# the device copy's git metadata can lag the tree it carries (seen 2026-11-29: it named the session's first
# commit): pass VLMPTQ_COMMIT=<short sha> in the run command; without it, a tree that differs from HEAD is
# tagged "+changes" so its results are not filed under the wrong commit
export VLMPTQ_COMMIT="${VLMPTQ_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- 2>/dev/null || echo +changes)}"

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
# a per-test limit when the image has pytest-timeout (one hung test cannot eat the phase's box)
PT_TIMEOUT=""
python3 -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT="--timeout=150"

GPU_TAG=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "-"))' 2>/dev/null || echo gpu)
# what later default phases need (s): the benchmark ~100-150, the solvers ~140
RESERVE_BENCH=0; has bench && RESERVE_BENCH=160
RESERVE_SOLVERS=0; has solvers && RESERVE_SOLVERS=150
RESERVE_PROFILE=0; has profile && RESERVE_PROFILE=150

TEST_RC="not run"
if has tests; then
    T=$(box "${TESTS_TIMEOUT:-240}" $(( RESERVE_BENCH + RESERVE_SOLVERS + RESERVE_PROFILE )))
    echo "$(el) === pytest tests/gpu (time box ${T}s)"
    # -v: one line per finished test (with xdist: "[gw3] [ 12%] FAILED tests/gpu/...") so a cut-off run still
    # names its failures; tracebacks come in the summary at the end
    timeout -k 5 "$T" python3 -m pytest ${TESTS:-tests/gpu} -v -ra --tb=short -p no:cacheprovider --confcutdir=tests/gpu \
        --ignore=tests/gpu/test_triton_moe_cuda.py $XDIST --maxfail=25 $PT_TIMEOUT --durations=12 \
        -p no:benchmark > "$OUT/pytest.log" 2>&1
    TEST_RC=$?
    echo "$(grep -cE ' PASSED ' "$OUT/pytest.log") passed, $(grep -cE ' (FAILED|ERROR) ' "$OUT/pytest.log") failed or errors, \
$(grep -cE ' SKIPPED ' "$OUT/pytest.log") skipped (as reported line by line)"
    grep -E ' (FAILED|ERROR) ' "$OUT/pytest.log" | sed 's/^/  /' | head -30
    awk '/= (FAILURES|ERRORS) =/{p=1} p' "$OUT/pytest.log" | head -150
    tail -n 25 "$OUT/pytest.log"
    echo "$(el) pytest exit code $TEST_RC (124 = timed out)"
fi

BENCH_RC="not run"
if has bench; then
    T=$(box 300 $(( RESERVE_SOLVERS + RESERVE_PROFILE )))
    echo "$(el) === benchmarks/kernels.py (time box ${T}s)"
    # its own budgets count from its start; --hard writes what it has and exits
    timeout -k 10 $(( T + 10 )) python3 benchmarks/kernels.py --tune --tune-ms 1,16,64,256 --out "$OUT" \
        --budget 150 --tune-budget 245 --quick-budget 255 --head-budget 265 --head-tune-budget 288 --hard "$T" \
        ${BENCH_ARGS:-}
    BENCH_RC=$?
    echo "$(el) benchmark exit code $BENCH_RC"
fi

SOLVERS_RC="not run"
if has solvers; then
    T=$(box 180 "$RESERVE_PROFILE")
    echo "$(el) === benchmarks/solvers.py (time box ${T}s)"
    timeout -k 10 "$T" python3 benchmarks/solvers.py --device cuda --repeats 2 --out "$OUT/solvers-$GPU_TAG-$(date +%F)"
    SOLVERS_RC=$?
    echo "$(el) solver benchmark exit code $SOLVERS_RC"
fi

if has solvers-moe; then
    # one Qwen3-VL-30B-A3B routed expert (docs/moe.md: 384 of them per MoE layer), seconds on a GPU
    echo "$(el) === benchmarks/solvers.py, MoE expert shapes"
    timeout -k 10 "$(box 120 0)" python3 benchmarks/solvers.py --device cuda --repeats 3 \
        --layers expert_gate expert_down --out "$OUT/solvers-moe-$GPU_TAG-$(date +%F)"
    SOLVERS_RC="$SOLVERS_RC, experts: $?"
fi

PROFILE_RC="not run"
if has profile; then
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
    echo "$(el) === Nsight Compute on benchmarks/kernel_profile.py (${NCU:-no ncu found})"
    if [[ -n "$NCU" ]]; then
        # --clock-control none: the card's clocks as found (never change them); one launch per case in the
        # NVTX range "profile"
        timeout -k 10 "$(box 150 60)" "$NCU" --clock-control none --nvtx --nvtx-include "profile/" \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
            python3 benchmarks/kernel_profile.py --cases ${NCU_CASES:-qkv:4:1 gate_up:4:1 gate_up:4:1:gemv gate_up:2:1 gate_up:bf16:1} \
            > "$OUT/ncu.txt" 2>&1
        PROFILE_RC="ncu $?"
        grep -E "^  [A-Za-z_].*\(|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Issued Ipc|No Eligible|Theoretical Occupancy|profiled:|==ERROR==|==WARNING==" \
            "$OUT/ncu.txt" | head -80
    fi
    echo "$(el) === benchmarks/solvers.py --profile"
    timeout -k 10 "$(box 150 0)" python3 benchmarks/solvers.py --device cuda --profile --layers o down \
        --methods gptq gptaq vlmptq > "$OUT/solvers-profile.txt" 2>&1
    PROFILE_RC="$PROFILE_RC, solvers $?"
    grep -E "^### |^\| vlmptq::" "$OUT/solvers-profile.txt"
    echo "$(el) profile exit codes: $PROFILE_RC"
fi

MOE_RC="not run"
if has moe; then
    echo "$(el) === fused MoE: pytest tests/gpu/test_triton_moe_cuda.py, benchmarks/moe_kernels.py"
    timeout -k 5 "${MOE_TEST_TIMEOUT:-180}" python3 -m pytest tests/gpu/test_triton_moe_cuda.py -v -ra --tb=short \
        -p no:cacheprovider --confcutdir=tests/gpu $XDIST --maxfail=10 $PT_TIMEOUT -p no:benchmark > "$OUT/moe-pytest.log" 2>&1
    MOE_RC="tests $?"
    grep -E ' (FAILED|ERROR) ' "$OUT/moe-pytest.log" | sed 's/^/  /' | head -20
    tail -n 25 "$OUT/moe-pytest.log"
    timeout -k 10 "${MOE_TIMEOUT:-150}" python3 benchmarks/moe_kernels.py --out "$OUT" ${MOE_ARGS:-}
    MOE_RC="$MOE_RC, benchmark $?"
    echo "$(el) fused MoE exit codes: $MOE_RC"
fi

echo
echo "==================================== GPU CHECK SUMMARY ($(el)) ===================================="
echo "gpu: $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)  commit: $VLMPTQ_COMMIT"
echo "pytest tests/gpu: exit $TEST_RC    benchmark: exit $BENCH_RC    solvers: exit $SOLVERS_RC    profile: $PROFILE_RC    moe: $MOE_RC"
[[ -f "$OUT/pytest.log" ]] && grep -E ' (FAILED|ERROR) ' "$OUT/pytest.log" | sed 's/^/  /' | head -30
SOLMD=$(ls -t "$OUT"/solvers-*.md 2>/dev/null | head -1)
[[ -n "$SOLMD" ]] && awk '/^\| layer/{p=1} p&&/^$/{exit} p' "$SOLMD"
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
