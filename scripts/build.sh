#!/usr/bin/env bash
# Configures (once) and builds mlaforge into build/ with ccache; the program lands at build/mlaforge.
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_SLOPPINESS=pch_defines,time_macros
export CCACHE_DIR="${CCACHE_DIR:-$PWD/.cache/ccache}"
[ -f build/CMakeCache.txt ] || cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build -j"$(nproc)"
