#!/usr/bin/env bash
# One GPU-machine session for the full-size work (device tool; issues 4 and 6): the CUDA build,
# random-weight checkpoints with real 7B configurations made by transformers (tools/make_fullsize.py),
# a streaming bf16 conversion of one on the GPU with its peak memory and per-layer times, and
# mlaforge against transformers on each (tests/fullsize_test.cpp). Logs go to $OUT (or /tmp/gpu-out).
# Usage: bash scripts/gpu_fullsize.sh [convert-model] [reference-models]   ("" skips a part)
#   defaults: qwen2.5-vl-7b  qwen2.5-vl-7b,llava-1.5-7b,llama3-llava-next-8b (rope pairs 16, dkv 32)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
fs=${FULLSIZE_DIR:-/tmp/fullsize}
conv=${1-qwen2.5-vl-7b}
refs=${2-qwen2.5-vl-7b,llava-1.5-7b,llama3-llava-next-8b}
mkdir -p "$out" "$fs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
( time bash scripts/cuda_build.sh ) > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
tail -3 "$out/build.log"
convert_one() {  # the streaming bf16 conversion on the GPU, peak memory and per-layer times
  OMP_WAIT_POLICY=PASSIVE build-cuda/mlaforge convert --model "$fs/$conv" --out "$fs/$conv-mla" --device cuda \
    --calib ${CALIB:-.fixture-data/shapes/calib.jsonl} --calib-samples ${CALIB_SAMPLES:-64} --rope-pairs ${ROPE_PAIRS:-16} \
    --dkv ${DKV:-32} > "$out/convert-$conv.log" 2>&1
  echo "convert rc=$?"; tr "\r" "\n" < "$out/convert-$conv.log" | grep -v "^\s*$" | cut -c1-200 | tail -40
  cp "$fs/$conv-mla/conversion_report.json" "$out/conversion_report-$conv.json" 2>/dev/null
  build-cuda/mlaforge inspect "$fs/$conv-mla" 2>&1 | tail -8
  rm -rf "$fs/$conv-mla" "$fs/$conv"
}
# One model at a time (disk: each 7B checkpoint is ~16 GB): make it and transformers' reference, compare.
for m in ${refs//,/ }; do
  d=$fs/ref-$m
  log=$out/fullsize-$m.log  # one file per model: $OUT brings back at most 8
  python3 tools/make_fullsize.py --model "$m" --out "$d" --reference > "$log" 2>&1
  echo "make $m rc=$?"; grep -E "^\{|Error|error|FAILED" "$log" | cut -c1-300 | tail -6
  MLAFORGE_FULLSIZE="$d" OMP_WAIT_POLICY=PASSIVE build-cuda/mlaforge_tests --gtest_filter='FullSize.*' >> "$log" 2>&1
  echo "fullsize $m rc=$?"; grep -E "\[fullsize\]|Failure|FAILED|Expected|Which is" "$log" | head -12
  if [ "$m" = "$conv" ]; then mv "$d/$m" "$fs/$m"; convert_one; fi
  rm -rf "$d/$m"
done
if [ -n "$conv" ] && [ -z "$(echo ",$refs," | grep ",$conv,")" ]; then
  python3 tools/make_fullsize.py --model "$conv" --out "$fs" > "$out/make-$conv.log" 2>&1; tail -2 "$out/make-$conv.log"
  convert_one
fi
