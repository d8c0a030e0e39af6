#!/usr/bin/env bash
# Installs every Debian 12 package the build and the tests need. Run as root on a fresh machine.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  build-essential cmake ccache pkg-config git \
  libtorch-dev libopenblas0-pthread \
  nlohmann-json3-dev libcli11-dev libpcre2-dev libutf8proc-dev \
  libpng-dev libjpeg62-turbo-dev \
  libgtest-dev libgmock-dev libbenchmark-dev \
  gnuplot-nox
