#!/usr/bin/env bash
# One GPU-machine session for the inference engine (device tool): CUDA build, the kernel check
# harness, the whole test suite on the CUDA build, `mlaforge bench` on the Qwen2.5-VL-7B-shaped decoder
# and on llava-1.5-7b's (MHA), and eval of the bundled model on cuda with and without CUDA graphs.
# Logs go to $OUT (or /tmp/gpu-out). Usage: bash scripts/gpu_session.sh [--no-tests]
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
if [ "${1-}" != --no-tests ]; then
  OMP_WAIT_POLICY=PASSIVE timeout 240 build-cuda/mlaforge_tests > "$out/tests.log" 2>&1
  echo "tests rc=$?"; grep -E "FAILED|Failure|PASSED|SKIPPED \]|tests ran|graph vs eager" "$out/tests.log" | head -20
fi
m=bench/configs/qwen2.5-vl-7b-text
specs=("8192 16 bf16 auto" "16384 16 bf16 auto" "32768 16 bf16 auto" "32768 1 bf16 auto" "8192 16 int4 auto" "8192 16 int4 int8")
for spec in "${specs[@]}"; do
  set -- $spec
  timeout 150 build-cuda/mlaforge bench --model $m --device cuda --context $1 --batch $2 --kv-cache $3 --kv-rope $4 \
    --report "$out/bench-$1-$2-$3-$4.json" > "$out/bench-$1-$2-$3-$4.log" 2>&1
  echo "== bench context $1 batch $2 latent $3 rope $4 rc=$?"; tail -14 "$out/bench-$1-$2-$3-$4.log"
done
# llava-1.5-7b (MHA, 32 KV heads): 4 rotary pairs and dkv 8 per head (latent 256): the MHA row-pair kernel.
timeout 150 build-cuda/mlaforge bench --model bench/configs/llava-1.5-7b --device cuda --context 8192 --batch 16 \
  --rope-pairs 4 --dkv 8 --report "$out/bench-llava-r4d8.json" > "$out/bench-llava-r4d8.log" 2>&1
echo "== bench llava-1.5-7b r4 dkv8 rc=$?"; tail -14 "$out/bench-llava-r4d8.log"
# llava-1.5-7b at the default conversion (16 pairs, dkv 32: latent 1024): the two-pass kernels.
timeout 150 build-cuda/mlaforge bench --model bench/configs/llava-1.5-7b --device cuda --context 8192 --batch 16 \
  --report "$out/bench-llava-default.json" > "$out/bench-llava-default.log" 2>&1
echo "== bench llava-1.5-7b default conversion rc=$?"; tail -14 "$out/bench-llava-default.log"
# The bundled model converted on cuda and evaluated there, decoding with and without CUDA graphs.
mf=build-cuda/mlaforge
$mf convert --model models/qwen2vl-shapes --out /tmp/mla-r8d16 --calib data/shapes-mini/calib.jsonl --rope-pairs 8 \
  --dkv 16 --device cuda > "$out/convert.log" 2>&1 || tail -5 "$out/convert.log"
for spec in "bf16 auto 0" "int4 int8 16"; do
  set -- $spec
  for graph in "" --no-cuda-graph; do
    $mf eval --model /tmp/mla-r8d16 --data data/shapes-mini/eval.jsonl --device cuda --kv-cache $1 --kv-rope $2 \
      --kv-window $3 $graph --report "$out/eval-$1$graph.json" > "$out/eval-$1$graph.log" 2>&1
    echo "== eval cuda $spec ${graph:-graph} rc=$? $(head -1 "$out/eval-$1$graph.log") $(grep -o '"seconds": [0-9.]*' "$out/eval-$1$graph.json")"
  done
done
