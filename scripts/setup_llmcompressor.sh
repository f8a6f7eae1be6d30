#!/usr/bin/env bash
# Idempotent set-up of a venv with llm-compressor (PyPI `llmcompressor`) on torch 2.13.0 CPU, for
# benchmarks/peers.py (the head-to-head with llm-compressor's REAP expert pruning). llm-compressor pins its own
# transformers (5.17 for 0.14.0.1), so it lives in a venv of its own; the project's .venv stays untouched and
# nothing of moe-compress is installed there: the benchmark runs benchmarks/peers_reap_runner.py with this venv's
# python on local directories only.
#
# Exit 0: $LLMCOMPRESSOR_VENV/bin/python imports llmcompressor's REAPPruningModifier. Exit 1 with a one-line
# `error:` when it cannot be installed.
# Environment: PYTHON (interpreter for the venv, default python3), LLMCOMPRESSOR_VENV (default
# ~/.cache/moe-compress/venv-llmcompressor-0.14.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LLMC_SPEC="llmcompressor==0.14.0.1"
TORCH_SPEC="torch==2.13.0"
VENV=${LLMCOMPRESSOR_VENV:-$HOME/.cache/moe-compress/venv-llmcompressor-0.14.0.1}
stamp="$VENV/.moe-compress-llmcompressor-installed"
want="$LLMC_SPEC $TORCH_SPEC"
# shellcheck source=venv_lib.sh
. scripts/venv_lib.sh

probe() {
  # llm-compressor's REAP modifier imports, with the CPU torch we asked for.
  "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import torch
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.pruning import REAPPruningModifier  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert torch.version.cuda is None, "not the CPU build of torch"
EOF
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && probe; then
  echo "$VENV: $LLMC_SPEC ready"
  exit 0
fi

start=$(date +%s)
create_venv_with_cpu_torch "$LLMC_SPEC"
if ! probe; then
  "$VENV/bin/python" -c "from llmcompressor.modifiers.pruning import REAPPruningModifier" 2>&1 | tail -n 3 >&2 || true
  fail "$LLMC_SPEC installed into $VENV but does not import (traceback above); remove $VENV, rerun this script"
fi
echo "$want" >"$stamp"
echo "$VENV: $LLMC_SPEC installed in $(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1)"
