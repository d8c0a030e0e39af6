#!/usr/bin/env bash
# The main job on the bundled model: build, show the model, and evaluate it on the bundled questions.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
bash scripts/build.sh >/dev/null
./build/mlaforge inspect models/qwen2vl-shapes
./build/mlaforge eval --model models/qwen2vl-shapes --data data/shapes-mini/eval.jsonl --report build/eval-report.json
