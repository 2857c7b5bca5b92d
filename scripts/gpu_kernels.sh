#!/usr/bin/env bash
# Lesson 02's Triton kernels on the GPU, in one command (run from the repository root):
#   1. the compiled kernels against a float64 oracle (tests/test_kernels.py -m gpu);
#   2. the benchmark: decode vs SDPA / FlexAttention / copy bandwidth, extend vs SDPA, tuning variants.
# Writes under $OUT (default course/results): test_kernels_gpu.txt, paged_kernels.log, paged_kernels.json.
# Stays under ~8 minutes (the benchmark starts no new variant after --budget-s seconds).
set -uo pipefail
OUT="${OUT:-course/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu_info.txt" 2>&1 || true

# addopts="" because the GPU image has no nbval (pyproject's addopts name its options)
timeout 150 python -m pytest tests/test_kernels.py -m gpu -q -o addopts="" -p no:cacheprovider 2>&1 \
    | tee "$OUT/test_kernels_gpu.txt"
tests=${PIPESTATUS[0]}

timeout 420 python -m nexus_lessons.bench.paged_kernels --out "$OUT" --budget-s 300 "$@" 2>&1 \
    | tee "$OUT/paged_kernels.log"
bench=${PIPESTATUS[0]}

echo "gpu tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
