#!/usr/bin/env bash
# The main job on the bundled model: convert qwen2vl-shapes to MLA (KV cache -75%), fine-tune it
# briefly on the bundled training rows, and compare accuracy and KV bytes per token before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
bash scripts/build.sh >/dev/null
out=build/main-job
rm -rf "$out" && mkdir -p "$out"
mf=./build/mlaforge
data=data/shapes-mini
$mf inspect models/qwen2vl-shapes
$mf convert --model models/qwen2vl-shapes --out "$out/mla" --calib $data/calib.jsonl --rope-pairs 8 --dkv 16
# A brief run on few rows: a gentler learning rate than the default 2e-4 (which suits full epochs).
$mf finetune --model "$out/mla" --data $data/train.jsonl --out "$out/mla-ft" --save-every 0 --lr 5e-5
for m in original mla mla-ft; do
  dir=$out/$m; [ $m = original ] && dir=models/qwen2vl-shapes
  $mf eval --model "$dir" --data $data/eval.jsonl --reference models/qwen2vl-shapes --report "$out/eval-$m.json" | head -2
done
# The fine-tuned model served from a quantized latent cache.
$mf eval --model "$out/mla-ft" --data $data/eval.jsonl --kv-cache int8 --report "$out/eval-int8.json" | head -1
$mf eval --model "$out/mla-ft" --data $data/eval.jsonl --kv-cache int4 --kv-rope int8 --report "$out/eval-int4.json" | head -1

field() { sed -n "s/^ *\"$2\": \([0-9.e+-]*\),\{0,1\}$/\1/p" "$1" | head -1; }
kv() { $mf inspect "$1" | sed -n 's/.* \([0-9][0-9]*\) bytes\/token in bf16.*/\1/p' | tail -1; }
pool() { $mf inspect "$out/mla-ft" | sed -n "s/.*$1 \([0-9][0-9]*\).*/\1/p"; }
echo
echo "| model | KV cache bytes/token | accuracy | KL(original \|\| model) per answer token |"
echo "| --- | --- | --- | --- |"
printf "| original (GQA) | %s | %.3f | %.4f |\n" "$(kv models/qwen2vl-shapes)" "$(field $out/eval-original.json accuracy)" \
  "$(field $out/eval-original.json mean_kl)"
printf "| MLA, 8 rotary pairs, dkv 16 | %s | %.3f | %.4f |\n" "$(kv $out/mla)" "$(field $out/eval-mla.json accuracy)" \
  "$(field $out/eval-mla.json mean_kl)"
printf "| MLA, fine-tuned on %s rows | %s | %.3f | %.4f |\n" "$(wc -l < $data/train.jsonl)" "$(kv $out/mla-ft)" \
  "$(field $out/eval-mla-ft.json accuracy)" "$(field $out/eval-mla-ft.json mean_kl)"
printf "| the same, int8 latent cache | %s | %.3f | |\n" "$(pool 'int8')" "$(field $out/eval-int8.json accuracy)"
printf "| the same, int4 latent + int8 rotary keys | %s | %.3f | |\n" "$(pool 'int4 + int8 rotary')" \
  "$(field $out/eval-int4.json accuracy)"
