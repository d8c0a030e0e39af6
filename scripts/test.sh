#!/usr/bin/env bash
# The README's test command: build, then run every test through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
