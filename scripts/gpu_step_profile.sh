#!/usr/bin/env bash
# Per-kernel profile of one eager decoding step (device tool, after scripts/cuda_build.sh): `mlaforge bench`
# marks its fourth eager step with an NVTX range (decode_step_mla / decode_step_original) and Nsight Compute
# times each kernel inside it; tools/ncu_step_summary.py groups them by name.
# Usage: bash scripts/gpu_step_profile.sh mla|original BENCH_ARGS...   (logs to $OUT, or /tmp/gpu-out)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
which=$1
shift
timeout 300 ncu --clock-control none --nvtx --nvtx-include "decode_step_$which/" --metrics gpu__time_duration.sum \
  --csv --print-units base build-cuda/mlaforge bench --decode-steps 6 "$@" > "$out/step-$which.csv" 2> "$out/step-$which.err"
echo "ncu rc=$?"
python3 tools/ncu_step_summary.py "$out/step-$which.csv" | tee "$out/step-$which.txt" | head -30
