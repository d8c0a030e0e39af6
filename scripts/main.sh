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

field() { sed -n "s/^ *\"$2\": \([0-9.e+-]*\),\{0,1\}$/\1/p" "$1" | head -1; }
kv() { $mf inspect "$1" | sed -n 's/.* \([0-9][0-9]*\) bytes\/token in bf16.*/\1/p' | tail -1; }
echo
echo "| model | KV cache bytes/token (bf16) | accuracy | KL(original \|\| model) per answer token |"
echo "| --- | --- | --- | --- |"
printf "| original (GQA) | %s | %.3f | %.4f |\n" "$(kv models/qwen2vl-shapes)" "$(field $out/eval-original.json accuracy)" \
  "$(field $out/eval-original.json mean_kl)"
printf "| MLA, 8 rotary pairs, dkv 16 | %s | %.3f | %.4f |\n" "$(kv $out/mla)" "$(field $out/eval-mla.json accuracy)" \
  "$(field $out/eval-mla.json mean_kl)"
printf "| MLA, fine-tuned on %s rows | %s | %.3f | %.4f |\n" "$(wc -l < $data/train.jsonl)" "$(kv $out/mla-ft)" \
  "$(field $out/eval-mla-ft.json accuracy)" "$(field $out/eval-mla-ft.json mean_kl)"
