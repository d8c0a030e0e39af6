#!/usr/bin/env bash
# The CUDA build, on a machine with nvcc and PyTorch's libtorch (the GPU machine): configures
# build-cuda/ against the pip wheel's libtorch and builds it. PCRE2 and utf8proc may come from a
# folder with include/ and lib/ (MLAFORGE_DEPS_DIR, default .gpu-deps) where their -dev packages are
# missing. Extra arguments go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
deps=${MLAFORGE_DEPS_DIR:-$PWD/.gpu-deps}
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DMLAFORGE_DEPS_DIR="$deps" "$@"
cmake --build build-cuda -j"$(nproc)"
