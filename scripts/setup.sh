#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with moe-compress (editable), its test and demo extras,
# torch 2.13 CPU, and the demo text sources (Debian packages unpacked, no system install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.moe-compress-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  links=()
  [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  .venv/bin/python -m pip install --quiet "${links[@]}" "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
.venv/bin/moe-compress data fetch
