#!/usr/bin/env bash
# The test command. On a fresh clone, or right after the quickstart, it reuses (or makes) .venv, installs what the
# tests need there and runs the default test run; arguments go to pytest (e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test
. .venv/bin/activate
python -m pytest -q "$@"
