#!/usr/bin/env bash
# Issue 5's hardest criterion: at --rope-pairs 8 --dkv 8 (KV -81.25%) the text-only kinds must keep 95%
# of their original accuracy (text_add: 22/30 -> at least 21/30). Tries longer training and text-only
# rows seen more often (the 386 text-only rows of train.jsonl repeated; no other data), each fine-tune
# from the same conversion; prints accuracy, KL and the text kinds after each.
#
#   bash scripts/finetune_r8d8.sh [SHAPES_DATA_DIR] [cpu|cuda] [MLAFORGE_BINARY] [RUN...]
# RUN: epochs2, text4, text4-epochs2, calibtext-epochs2 (default: these four), epochs3, epochs4,
# lr4e-4-epochs2, attnmse-epochs2, epochs2-seed1, epochs2-seed2 (the 2-epoch run with other data orders:
# how much of text_add's 30 questions is the order's noise), kl30-epochs2 (KL weight 30 instead of 10),
# kl30-epochs2-seed1, kl30-epochs3, attn-epochs2 (attention weights only, input norms frozen), lr1e-4-epochs3
# (half the learning rate over three epochs), kl1000-epochs2 (KL weight 1000: AdamW normalises the step, so
# this is distillation alone, the answers' cross-entropy a rounding error beside it), lr1e-4-epochs3-seed1 (the
# lr 1e-4 run under another data order), lr1e-4-epochs3-kltext (the same, distilling the next-token
# distribution at every text position, the prompts' too, not the answers' alone), svd-lr1e-4-epochs3 (the lr 1e-4
# run from a plain-SVD conversion, --lowrank svd), svd-latent-lr5e-4-epochs3 (the same conversion, only the latent
# projections trained, --trainable latent, lr 5e-4), svd-mse-lr1e-4-epochs3 (--loss ce+attn-mse),
# svd-latent-polish (the recipe that meets the text clause at the default data order: svd-latent-lr5e-4-epochs3,
# which it runs first, then its text latent alone trained on the 386 text-only rows of train.jsonl, distilling the
# next-token distribution at every text position, lr 3e-4, 6 epochs), svd-latent-mse-polish (the same two stages with
# --loss ce+kl+attn-mse in both), svd-latent-mse10-polish (the same with the first stage's attention-output term
# weighted 10: the best overall accuracy), svd-latent-mse-add9-polish and svd-latent-mse-add17-polish
# (svd-latent-mse-polish with the text_add rows 9 or 17 times in the polish's rows; 17: the r8 dkv8 recipe, which keeps
# the sums under every data order tried). calibtext converts with the text-only rows of
# train.jsonl added to the calibration rows (the text latent then sees text-only prompts, 106 of them arithmetic,
# instead of 14). Runs may go in parallel (one invocation each) once the r8-d8 conversion exists.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/shapes}
dev=${2:-cpu}
mf=${3:-./build/mlaforge}
shift $(( $# < 3 ? $# : 3 ))
runs=${*:-epochs2 text4 text4-epochs2 calibtext-epochs2}
out=build/ft-r8d8
orig=models/qwen2vl-shapes
mkdir -p "$out"
[[ "$runs" =~ ^(calibtext-epochs2|svd-[a-z0-9-]*( svd-[a-z0-9-]*)*)$ ]] || [ -d "$out/r8-d8" ] || $mf convert --model $orig --out "$out/r8-d8" --calib "$data/calib.jsonl" --rope-pairs 8 --dkv 8 \
  --device "$dev" --dtype f32 >/dev/null
# Derived row files go to $out (the data folder may be read-only), their image paths made absolute.
absolute() { sed "s#\"image\": \"#\"image\": \"$(cd "$data" && pwd)/#" "$1"; }
text_rows=$out/train-text.jsonl  # the 386 text-only rows (no "image") of train.jsonl
grep -v '"image"' "$data/train.jsonl" > "$text_rows"
for k in 9 17; do  # the same with its 106 text_add rows (the sums) k times
  { cat "$text_rows"; for i in $(seq 2 $k); do grep '"kind": "text_add"' "$text_rows"; done; } > "$out/train-text-add$k.jsonl"
done
text4=$out/train-text4.jsonl  # train.jsonl with its text-only rows four times
{ absolute "$data/train.jsonl"; for i in 1 2 3; do cat "$text_rows"; done; } > "$text4"
calibtext=$out/calib-text.jsonl
{ absolute "$data/calib.jsonl"; cat "$text_rows"; } > "$calibtext"
if [[ " $runs " == *" calibtext"* ]] && [ ! -d "$out/r8-d8-calibtext" ]; then
  $mf convert --model $orig --out "$out/r8-d8-calibtext" --calib "$calibtext" --calib-samples 100000 --rope-pairs 8 \
    --dkv 8 --device "$dev" --dtype f32 >/dev/null
fi
if [[ " $runs " == *" svd-"* ]] && [ ! -d "$out/r8-d8-svd" ]; then
  $mf convert --model $orig --out "$out/r8-d8-svd" --calib "$data/calib.jsonl" --rope-pairs 8 --dkv 8 --lowrank svd \
    --device "$dev" --dtype f32 >/dev/null
fi
[[ " $runs " != *" svd-latent-polish "* ]] || runs="svd-latent-lr5e-4-epochs3 $runs"
[[ " $runs " != *" svd-latent-mse-polish "* ]] || runs="svd-latent-mse-lr5e-4-epochs3 $runs"
[[ " $runs " != *" svd-latent-mse10-polish "* ]] || runs="svd-latent-mse10-lr5e-4-epochs3 $runs"
[[ " $runs " != *" svd-latent-mse-add"* ]] || runs="svd-latent-mse-lr5e-4-epochs3 $runs"
run() {  # NAME DATA EPOCHS CONVERTED [LR [LOSS [SEED [KL_WEIGHT [TRAINABLE [KL_POSITIONS [MSE_WEIGHT]]]]]]]
  local name=$1 train=$2 epochs=$3 model=$4 lr=${5:-2e-4} loss=${6:-ce+kl} seed=${7:-0} klw=${8:-10} trainable=${9:-attn+norms}
  local klpos=${10:-answers} msew=${11:-1}
  [[ " $runs " == *" $name "* ]] || return 0
  [ -f "$out/$name/finetune_report.json" ] || $mf finetune --model "$model" --teacher $orig --data "$train" \
    --out "$out/$name" --epochs "$epochs" --batch 16 --lr "$lr" --loss "$loss" --kl-weight "$klw" --seed "$seed" \
    --trainable "$trainable" --kl-positions "$klpos" --mse-weight "$msew" --device "$dev" >/dev/null
  [ -f "$out/$name.eval.json" ] || $mf eval --model "$out/$name" --data "$data/eval.jsonl" --reference $orig \
    --device "$dev" --dtype f32 --report "$out/$name.eval.json" >/dev/null
  printf "%-28s " "$name"
  grep -o '"accuracy": [0-9.]*\|"mean_kl": [0-9.e-]*' "$out/$name.eval.json" | head -2 | tr '\n' ' '
  for k in text_add text_day text_letters text_month; do
    tr -d '\n ' < "$out/$name.eval.json" | grep -o "\"by_kind_counts\":{.*" | grep -o "\"$k\":{\"correct\":[0-9]*,\"total\":[0-9]*" \
      | sed 's/"\([a-z_]*\)":{"correct":\([0-9]*\),"total":\([0-9]*\)/\1 \2\/\3 /' | tr '\n' ' '
  done
  echo
}
run epochs2 "$data/train.jsonl" 2 "$out/r8-d8"
run text4 "$text4" 1 "$out/r8-d8"
run text4-epochs2 "$text4" 2 "$out/r8-d8"
run calibtext-epochs2 "$data/train.jsonl" 2 "$out/r8-d8-calibtext"
run epochs3 "$data/train.jsonl" 3 "$out/r8-d8"
run epochs4 "$data/train.jsonl" 4 "$out/r8-d8"
run lr4e-4-epochs2 "$data/train.jsonl" 2 "$out/r8-d8" 4e-4
run attnmse-epochs2 "$data/train.jsonl" 2 "$out/r8-d8" 2e-4 ce+attn-mse
run epochs2-seed1 "$data/train.jsonl" 2 "$out/r8-d8" 2e-4 ce+kl 1
run epochs2-seed2 "$data/train.jsonl" 2 "$out/r8-d8" 2e-4 ce+kl 2
run kl30-epochs2 "$data/train.jsonl" 2 "$out/r8-d8" 2e-4 ce+kl 0 30
run attn-epochs2 "$data/train.jsonl" 2 "$out/r8-d8" 2e-4 ce+kl 0 10 attn
run kl30-epochs2-seed1 "$data/train.jsonl" 2 "$out/r8-d8" 2e-4 ce+kl 1 30
run kl30-epochs3 "$data/train.jsonl" 3 "$out/r8-d8" 2e-4 ce+kl 0 30
run lr1e-4-epochs3 "$data/train.jsonl" 3 "$out/r8-d8" 1e-4
run kl1000-epochs2 "$data/train.jsonl" 2 "$out/r8-d8" 2e-4 ce+kl 0 1000
run lr1e-4-epochs3-seed1 "$data/train.jsonl" 3 "$out/r8-d8" 1e-4 ce+kl 1
run lr1e-4-epochs3-kltext "$data/train.jsonl" 3 "$out/r8-d8" 1e-4 ce+kl 0 10 attn+norms text
run svd-lr1e-4-epochs3 "$data/train.jsonl" 3 "$out/r8-d8-svd" 1e-4
run svd-latent-lr5e-4-epochs3 "$data/train.jsonl" 3 "$out/r8-d8-svd" 5e-4 ce+kl 0 10 latent
run svd-mse-lr1e-4-epochs3 "$data/train.jsonl" 3 "$out/r8-d8-svd" 1e-4 ce+attn-mse
# With --trainable latent on text-only rows no image token reaches the image latent's down/up weights: they get no
# gradient and stay bit-identical; what moves is the text latent and the up projection's bias, which both share.
run svd-latent-polish "$text_rows" 6 "$out/svd-latent-lr5e-4-epochs3" 3e-4 ce+kl 0 10 latent text
run svd-latent-mse-lr5e-4-epochs3 "$data/train.jsonl" 3 "$out/r8-d8-svd" 5e-4 ce+kl+attn-mse 0 10 latent
run svd-latent-mse-polish "$text_rows" 6 "$out/svd-latent-mse-lr5e-4-epochs3" 3e-4 ce+kl+attn-mse 0 10 latent text
run svd-latent-mse10-lr5e-4-epochs3 "$data/train.jsonl" 3 "$out/r8-d8-svd" 5e-4 ce+kl+attn-mse 0 10 latent answers 10
run svd-latent-mse10-polish "$text_rows" 6 "$out/svd-latent-mse10-lr5e-4-epochs3" 3e-4 ce+kl+attn-mse 0 10 latent text
run svd-latent-mse-add9-polish "$out/train-text-add9.jsonl" 6 "$out/svd-latent-mse-lr5e-4-epochs3" 3e-4 ce+kl+attn-mse 0 10 latent text
run svd-latent-mse-add17-polish "$out/train-text-add17.jsonl" 6 "$out/svd-latent-mse-lr5e-4-epochs3" 3e-4 ce+kl+attn-mse 0 10 latent text
