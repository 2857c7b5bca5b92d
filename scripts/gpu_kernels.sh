#!/usr/bin/env bash
# Lesson 01-02's GPU measurements in one command, run from the repository root:
#   OUT=dir bash scripts/gpu_kernels.sh [all|tests|sweep|kernels|decode]
#
#   tests    the compiled kernels against float64 oracles (pytest -m gpu: kernels, GEMV, RoPE)  ~2 min
#   sweep    decode attention over batch x context vs SDPA and Flex (decode_sweep.json)        ~3 min
#   kernels  paging, waves and extend (paged_kernels.json)                                      ~1 min
#   decode   batch-1 decode of a 1B Llama vs transformers (gpu_decode.json)                     ~3.5 min
#   all      the four in that order, inside one deadline of BUDGET_S seconds (default 570)
#
# Every step has a timeout (never past the deadline), and every benchmark saves its JSON as it goes, so a
# step that runs out of time still leaves what it measured. Writes under $OUT (default course/results):
# gpu_info.txt, test_kernels_gpu.txt, decode_sweep.json, paged_kernels.json, gpu_decode.json and a log each.
set -uo pipefail
OUT="${OUT:-course/results}"
MODE="${1:-all}"
BUDGET_S="${BUDGET_S:-570}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
: > "$OUT/gpu_kernels_summary.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu_info.txt" 2>&1 || true
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$OUT/gpu_info.txt" 2>&1

status=0
# step NAME CAP_S COMMAND...: run COMMAND with a timeout of CAP_S, or what is left of the budget if less.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -le 10 ]; then
        echo "== $name: skipped, the budget is spent" | tee -a "$OUT/gpu_kernels_summary.txt"
        status=1
        return
    fi
    echo "== $name (timeout ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/${name}_log.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc (124 = timed out) after $(( $(date +%s) - START ))s in all" | tee -a "$OUT/gpu_kernels_summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
    # addopts="" because the GPU image has no nbval (pyproject's addopts name its options)
    step test_kernels_gpu 150 python -m pytest tests/test_kernels.py tests/test_gemv.py tests/test_rope.py -m gpu -q \
        -o addopts="" -p no:cacheprovider
    cp "$OUT/test_kernels_gpu_log.txt" "$OUT/test_kernels_gpu.txt" 2>/dev/null || true
fi
if [ "$MODE" = all ] || [ "$MODE" = sweep ]; then
    if [ "$MODE" = all ]; then sweep_budget=(--budget-s 170 --flex-budget-s 110); else sweep_budget=(); fi
    step decode_sweep 330 python -m nexus_lessons.bench decode_sweep --out "$OUT" "${sweep_budget[@]}"
fi
if [ "$MODE" = all ] || [ "$MODE" = kernels ]; then
    step paged_kernels 120 python -m nexus_lessons.bench paged_kernels --out "$OUT"
fi
if [ "$MODE" = all ] || [ "$MODE" = decode ]; then
    step gpu_decode 330 python -m nexus_lessons.bench gpu_decode --out "$OUT"
fi
echo "done in $(( $(date +%s) - START ))s, exit $status"
exit $status
