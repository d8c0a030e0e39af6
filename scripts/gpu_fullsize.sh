#!/usr/bin/env bash
# One GPU-machine session for the full-size work (device tool; issues 4 and 6): the CUDA build,
# random-weight checkpoints with real 7B configurations made by transformers (tools/make_fullsize.py),
# a streaming bf16 conversion of one on the GPU with its peak memory and per-layer times, and
# mlaforge against transformers on each (tests/fullsize_test.cpp). Logs go to $OUT (or /tmp/gpu-out).
# Usage: bash scripts/gpu_fullsize.sh [convert-model] [reference-models]   ("" skips a part)
#   defaults: qwen2-vl-7b  qwen2-vl-7b,llava-1.5-7b
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
fs=${FULLSIZE_DIR:-/tmp/fullsize}
conv=${1-qwen2-vl-7b}
refs=${2-qwen2-vl-7b,llava-1.5-7b}
mkdir -p "$out" "$fs"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
( time bash scripts/cuda_build.sh ) > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
tail -3 "$out/build.log"
if [ -n "$refs" ]; then
  python3 tools/make_fullsize.py --model "$refs" --out "$fs" --reference > "$out/make-refs.log" 2>&1
  echo "make refs rc=$?"; grep -E "^\{|Error|error|FAILED" "$out/make-refs.log" | cut -c1-400 | tail -12
  MLAFORGE_FULLSIZE="$fs" OMP_WAIT_POLICY=PASSIVE build-cuda/mlaforge_tests --gtest_filter='FullSize.*' > "$out/fullsize.log" 2>&1
  echo "fullsize rc=$?"; grep -E "\[fullsize\]|Failure|FAILED|error|Expected|Which is" "$out/fullsize.log" | head -30
fi
if [ -n "$conv" ]; then
  [ -d "$fs/$conv" ] || { python3 tools/make_fullsize.py --model "$conv" --out "$fs" > "$out/make-$conv.log" 2>&1;
                          tail -2 "$out/make-$conv.log"; }
  OMP_WAIT_POLICY=PASSIVE build-cuda/mlaforge convert --model "$fs/$conv" --out "$fs/$conv-mla" --device cuda \
    --calib .fixture-data/shapes/calib.jsonl --calib-samples ${CALIB_SAMPLES:-64} --rope-pairs 32 --dkv 32 > "$out/convert-$conv.log" 2>&1
  echo "convert rc=$?"; tr "\r" "\n" < "$out/convert-$conv.log" | grep -v "^\s*$" | cut -c1-200 | tail -42
  cp "$fs/$conv-mla/conversion_report.json" "$out/conversion_report-$conv.json" 2>/dev/null
  build-cuda/mlaforge inspect "$fs/$conv-mla" 2>&1 | tail -12
  rm -rf "$fs/$conv-mla" "$fs/$conv"  # disk: each 7B checkpoint is ~16 GB
fi
