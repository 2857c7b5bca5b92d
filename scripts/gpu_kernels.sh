#!/usr/bin/env bash
# Lesson 02's Triton kernels on the GPU, in one command (run from the repository root):
#   1. tests: the compiled kernels against a float64 oracle (tests/test_kernels.py -m gpu);
#   2. bench: decode vs SDPA / FlexAttention / copy bandwidth, extend vs SDPA, tuning variants.
# Usage: OUT=dir scripts/gpu_kernels.sh [all|tests|bench|schedule] [extra benchmark options]
# "schedule" (not part of "all"): the decode schedules side by side, split vs stream-K vs SDPA, at the
# benchmark's shapes, past a full wave and on mixed lengths (decode_streamk_h200.json, ~4 minutes).
# "waves" (not part of "all"): the wave diagnostic (decode_waves_h200.json), then Nsight Compute on ours and
# SDPA at 64 x 4096 and 1 x 32768 (ncu_decode_*.txt; needs ncu and hardware counters, ~2 minutes).
# Writes under $OUT (default course/results): gpu_info.txt, test_kernels_gpu.txt, paged_kernels.log,
# paged_kernels.json. "all" stays under ~9.8 minutes: each step has a timeout, and the benchmark starts
# no new tuning variant after --budget-s seconds (it saves its JSON after every case). The tests now also
# compile the fused decode merge and the k_new extend paths (TMA and pointer); if "all" runs short of
# time, run "tests" and "bench" as two calls.
set -uo pipefail
OUT="${OUT:-course/results}"
MODE="${1:-all}"
[ $# -gt 0 ] && shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu_info.txt" 2>&1 || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu_info.txt" 2>&1

tests=0
bench=0
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
    # addopts="" because the GPU image has no nbval (pyproject's addopts name its options)
    timeout 190 python -m pytest tests/test_kernels.py tests/test_gemv.py tests/test_rope.py -m gpu -q -o addopts="" -p no:cacheprovider 2>&1 \
        | tee "$OUT/test_kernels_gpu.txt"
    tests=${PIPESTATUS[0]}
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
    timeout 395 python -m nexus_lessons.bench.paged_kernels --out "$OUT" --budget-s 290 "$@" 2>&1 \
        | tee "$OUT/paged_kernels.log"
    bench=${PIPESTATUS[0]}
fi
if [ "$MODE" = schedule ]; then
    timeout 400 python -m nexus_lessons.bench.decode_waves --cases streamk --name decode_streamk_h200.json \
        --out "$OUT" 2>&1 | tee "$OUT/decode_streamk_log.txt"
    bench=${PIPESTATUS[0]}
fi
if [ "$MODE" = waves ]; then
    timeout 300 python -m nexus_lessons.bench.decode_waves --out "$OUT" 2>&1 | tee "$OUT/decode_waves_log.txt"
    bench=${PIPESTATUS[0]}
    for shape in "64 4096" "1 32768"; do
        timeout 120 ncu --clock-control none --section LaunchStats --section Occupancy --section SpeedOfLight \
            --section MemoryWorkloadAnalysis -k regex:"decode|flash|fmha|attn|sdpa|cudnn|merge|splitkv|combine" \
            python -m nexus_lessons.bench.decode_waves --once $shape > "$OUT/ncu_decode_${shape/ /x}.txt" 2>&1
    done
    timeout 200 ncu --clock-control none --section WarpStateStats --section SchedulerStats --section InstructionStats \
        --section LaunchStats -k regex:"decode_split|cudnn" python -m nexus_lessons.bench.decode_waves --once 64 4096 \
        > "$OUT/ncu_stalls_64x4096.txt" 2>&1
fi
echo "gpu tests exit $tests, benchmark exit $bench (124 = timed out)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
