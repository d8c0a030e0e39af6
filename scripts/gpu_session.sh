#!/usr/bin/env bash
# One GPU-machine session for the inference engine (device tool): CUDA build, the kernel check
# harness, the whole test suite on the CUDA build, and `mlaforge bench` on the Qwen2.5-VL-7B-shaped decoder.
# Logs go to $OUT (or /tmp/gpu-out). Usage: bash scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/gpu.txt" 2>&1
( time bash scripts/cuda_build.sh ) > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
tail -3 "$out/build.log"
if [ -f bench/cuda/mla_decode_check.cu ]; then
  nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DMLAFORGE_CUDA_SM90A -Isrc -o /tmp/mla_check bench/cuda/mla_decode_check.cu src/kernels/cuda/mla_decode.cu \
    > "$out/check-build.log" 2>&1 && timeout 120 /tmp/mla_check > "$out/check.log" 2>&1
  echo "check harness rc=$?"; tail -45 "$out/check.log" 2>/dev/null || tail -30 "$out/check-build.log"
fi
OMP_WAIT_POLICY=PASSIVE timeout 240 build-cuda/mlaforge_tests > "$out/tests.log" 2>&1
echo "tests rc=$?"; grep -E "FAILED|Failure|PASSED|SKIPPED \]|tests ran" "$out/tests.log" | head -20
m=bench/configs/qwen2.5-vl-7b-text
specs=("8192 16 bf16 auto" "32768 16 bf16 auto" "32768 1 bf16 auto" "8192 16 int4 auto")
for spec in "${specs[@]}"; do
  set -- $spec
  timeout 150 build-cuda/mlaforge bench --model $m --device cuda --context $1 --batch $2 --kv-cache $3 --kv-rope $4 \
    --report "$out/bench-$1-$2-$3-$4.json" > "$out/bench-$1-$2-$3-$4.log" 2>&1
  echo "== bench context $1 batch $2 latent $3 rope $4 rc=$?"; tail -13 "$out/bench-$1-$2-$3-$4.log"
done
