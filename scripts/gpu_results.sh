#!/usr/bin/env bash
# The course's GPU measurements, run from the repository root:
#   OUT=dir BUDGET_S=570 bash scripts/gpu_results.sh STEP...      (no STEP: tests sweep kernels decode)
#
#   tests        compiled kernels and GPU paths against their references (pytest -m gpu)      ~2-3 min
#   sweep        lesson 02: decode attention over batch x context vs SDPA and Flex (decode_sweep.json) ~3 min
#   kernels      lesson 02: paging, waves and extend (paged_kernels.json)                          ~1 min
#   decode       lesson 01: batch-1 decode of a 1B Llama vs transformers (gpu_decode.json)        ~3.5 min
#   quant        lesson 03: quantized decode/extend vs the bf16 kernel (quant_decode.json)         ~3-4 min
#   prefix       lesson 04: time to first token with a cached prefix (prefix_ttft_gpu.json)       ~2 min
#   distill      lesson 05: distil the draft from nexus-tiny ($OUT/distill/)                       ~4 min
#   speculative  lesson 05: draft and n-gram speculation vs plain decode (speculative_gpu.json)   ~3-4 min
#                (DRAFT=dir: another draft, e.g. $OUT/distill/nexus-tiny-draft from the distill step)
#   serving      lesson 10: the engine vs transformers' generate_batch (serving_gpu.json)         ~6 min
#
# The steps run in the order given, inside one deadline of BUDGET_S seconds. Every step has a timeout
# (never past the deadline), and every benchmark saves its JSON as it goes, so a step that runs out of
# time still leaves what it measured. Writes under $OUT (default course/results), with a log per step,
# gpu_info.txt and gpu_results_summary.txt.
set -uo pipefail
OUT="${OUT:-course/results}"
BUDGET_S="${BUDGET_S:-570}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
: > "$OUT/gpu_results_summary.txt"
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
        echo "== $name: skipped, the budget is spent" | tee -a "$OUT/gpu_results_summary.txt"
        status=1
        return
    fi
    echo "== $name (timeout ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/${name}_log.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc (124 = timed out) after $(( $(date +%s) - START ))s in all" | tee -a "$OUT/gpu_results_summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

[ $# -gt 0 ] || set -- tests sweep kernels decode
for what in "$@"; do
    case "$what" in
    tests)  # addopts="" because the GPU image has no nbval (pyproject's addopts name its options)
        step test_gpu 240 python -m pytest -m gpu -q -o addopts="" -p no:cacheprovider tests/test_kernels.py \
            tests/test_gemv.py tests/test_norm.py tests/test_rope.py tests/test_quant_kv.py tests/test_speculative.py tests/test_engine.py ;;
    sweep) step decode_sweep 330 python -m nexus_lessons.bench decode_sweep --out "$OUT" --budget-s 170 --flex-budget-s 110 ;;
    kernels) step paged_kernels 120 python -m nexus_lessons.bench paged_kernels --out "$OUT" ;;
    decode) step gpu_decode 330 python -m nexus_lessons.bench gpu_decode --out "$OUT" ;;
    quant) step quant_decode 300 python -m nexus_lessons.bench quant_decode --out "$OUT" --budget-s 180 ;;
    prefix) step prefix_ttft 200 python -m nexus_lessons.bench prefix_ttft --out "$OUT" ;;
    distill) step distill 330 python -m nexus_lessons.tiny.distill --out "$OUT/distill" --minutes "${DISTILL_MINUTES:-3.5}" ;;
    speculative) step speculative 330 python -m nexus_lessons.bench speculative --out "$OUT" ${DRAFT:+--draft "$DRAFT"} ;;
    serving) step serving 450 python -m nexus_lessons.bench serving --out "$OUT/serving_gpu.json" ;;
    *) echo "unknown step $what" >&2; status=1 ;;
    esac
done
echo "done in $(( $(date +%s) - START ))s, exit $status"
exit $status
