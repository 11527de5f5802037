#!/usr/bin/env bash
# The virtual environment the quickstart and the test command share: .venv (made when missing) with PyTorch and
# the project installed, plus the extra named by the argument (test: what the tests need).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# A CPU build of PyTorch unless one is installed already (install your CUDA build first on a GPU machine). It goes
# in before the project, whose torch>=2.8 would otherwise pull the default (CUDA) build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0 \
  || python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install --quiet -e ".${1:+[$1]}"
