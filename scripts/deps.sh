#!/usr/bin/env bash
# Installs the Debian packages (scripts/setup.sh) when they are missing; sourced by main.sh and test.sh.
if ! dpkg -s libtorch-dev libcli11-dev libutf8proc-dev libgtest-dev nlohmann-json3-dev ccache cmake >/dev/null 2>&1; then
  echo "installing build dependencies (scripts/setup.sh)..." >&2
  if [ "$(id -u)" = 0 ]; then bash "$(dirname "${BASH_SOURCE[0]}")/setup.sh"; else sudo bash "$(dirname "${BASH_SOURCE[0]}")/setup.sh"; fi
fi
