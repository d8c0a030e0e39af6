#!/usr/bin/env bash
# The main job on the bundled model: convert qwen2vl-shapes to MLA (KV cache -75%), then compare
# accuracy and KV bytes per token before and after on the bundled questions.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
bash scripts/build.sh >/dev/null
out=build/main-job
mkdir -p "$out"
mf=./build/mlaforge
$mf inspect models/qwen2vl-shapes
$mf convert --model models/qwen2vl-shapes --out "$out/qwen2vl-shapes-mla" --calib data/shapes-mini/calib.jsonl \
  --rope-pairs 8 --dkv 16
$mf inspect "$out/qwen2vl-shapes-mla" | tail -3
$mf eval --model models/qwen2vl-shapes --data data/shapes-mini/eval.jsonl --report "$out/eval-original.json" | head -1
$mf eval --model "$out/qwen2vl-shapes-mla" --data data/shapes-mini/eval.jsonl --report "$out/eval-mla.json" | head -1

field() { sed -n "s/^ *\"$2\": \([0-9.e+-]*\),\{0,1\}$/\1/p" "$1" | head -1; }
kv() { $mf inspect "$1" | sed -n 's/.* \([0-9][0-9]*\) bytes\/token in bf16.*/\1/p' | tail -1; }
echo
echo "| model | KV cache bytes/token (bf16) | accuracy on data/shapes-mini/eval.jsonl |"
echo "| --- | --- | --- |"
printf "| original (GQA) | %s | %.3f |\n" "$(kv models/qwen2vl-shapes)" "$(field $out/eval-original.json accuracy)"
printf "| MLA, 8 rotary pairs, dkv 16 | %s | %.3f |\n" "$(kv $out/qwen2vl-shapes-mla)" "$(field $out/eval-mla.json accuracy)"
