#!/usr/bin/env bash
# Reproduces docs/finetune.md's table: qwen2vl-shapes converted at several compressions, then fine-tuned
# one epoch on the 4000 training rows with each loss; accuracy on all of eval.jsonl and mean
# KL(original || model) over answer tokens, before and after.
#
#   bash scripts/finetune_ablation.sh [SHAPES_DATA_DIR] [cpu|cuda] [MLAFORGE_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/shapes}
dev=${2:-cpu}
mf=${3:-./build/mlaforge}
out=build/ft-ablation
mkdir -p "$out"
orig=models/qwen2vl-shapes
stats=$out/calib-stats.safetensors
table=$out/table.md
field() { sed -n "s/^ *\"$2\": \([0-9.e+-]*\),\{0,1\}$/\1/p" "$1" | head -1; }

convert() {  # NAME ROPE_PAIRS DKV [MODEL]
  [ -d "$out/$1" ] || $mf convert --model "${4:-$orig}" --out "$out/$1" --calib "$data/calib.jsonl" --rope-pairs "$2" \
    --dkv "$3" $( [ -z "${4:-}" ] && echo "--stats $stats" ) >/dev/null
}
evaluate() {  # MODEL REPORT
  [ -f "$2" ] || $mf eval --model "$1" --data "$data/eval.jsonl" --reference $orig --device "$dev" --dtype f32 --report "$2" >/dev/null
}
finetune() {  # NAME MODEL LOSS KL_WEIGHT [STAGE]
  [ -f "$out/$1/finetune_report.json" ] || $mf finetune --model "$2" --teacher $orig --data "$data/train.jsonl" \
    --out "$out/$1" --epochs 1 --batch 16 --lr 2e-4 --loss "$3" --kl-weight "$4" --device "$dev" \
    --eval "$data/eval.jsonl" --no-eval-before ${5:+--stage $5} >/dev/null
  cp "$out/$1/eval_log.csv" "$out/$1.eval_log.csv"
}
row() {  # LABEL BEFORE_REPORT AFTER_NAME SECONDS_FROM
  local after=$out/$3/eval_log.csv
  printf "| %s | %.3f | %.4f | %s | %s | %s |\n" "$1" "$(field "$2" accuracy)" "$(field "$2" mean_kl)" \
    "$(tail -1 "$after" | cut -d, -f2)" "$(tail -1 "$after" | cut -d, -f3 | xargs printf %.4f)" \
    "$(field "$out/$3/finetune_report.json" tokens_per_s | xargs printf %.0f)" >> "$table"
}

evaluate $orig $out/original.json
convert r8-d16 8 16
convert r8-d8 8 8
convert r4-d4 4 4
convert r8-stage1 8 full
for m in r8-d16 r8-d8 r4-d4; do evaluate $out/$m $out/$m.before.json; done
finetune r8-d16-ce $out/r8-d16 ce 1
finetune r8-d16-kl $out/r8-d16 ce+kl 1
finetune r8-d16-kl10 $out/r8-d16 ce+kl 10
finetune r8-d16-mse $out/r8-d16 ce+attn-mse 1
finetune r8-stage1-kl10 $out/r8-stage1 ce+kl 10 1
convert r8-stage1-d16 8 16 $out/r8-stage1-kl10
evaluate $out/r8-stage1-d16 $out/r8-stage1-d16.before.json
finetune r8-stage2-kl10 $out/r8-stage1-d16 ce+kl 10 2
finetune r8-d8-kl10 $out/r8-d8 ce+kl 10
finetune r8-d8-mse $out/r8-d8 ce+attn-mse 1
finetune r4-d4-kl10 $out/r4-d4 ce+kl 10
finetune r4-d4-ce $out/r4-d4 ce 1

{
  echo "| run | accuracy before | KL before | accuracy after | KL after | train tokens/s ($dev) |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf "| original | %.3f | 0 | - | - | - |\n" "$(field $out/original.json accuracy)"
} > "$table"
row "r8 dkv16 (-75%), ce" $out/r8-d16.before.json r8-d16-ce
row "r8 dkv16, ce+kl" $out/r8-d16.before.json r8-d16-kl
row "r8 dkv16, ce+kl x10" $out/r8-d16.before.json r8-d16-kl10
row "r8 dkv16, ce+attn-mse" $out/r8-d16.before.json r8-d16-mse
row "r8 dkv16, stage 1 (ce+kl x10) then 2 (ce+kl x10)" $out/r8-stage1-d16.before.json r8-stage2-kl10
row "r8 dkv8 (-81.25%), ce+kl x10" $out/r8-d8.before.json r8-d8-kl10
row "r8 dkv8, ce+attn-mse" $out/r8-d8.before.json r8-d8-mse
row "r4 dkv4 (-90.6%), ce+kl x10" $out/r4-d4.before.json r4-d4-kl10
row "r4 dkv4, ce" $out/r4-d4.before.json r4-d4-ce
cat "$table"
