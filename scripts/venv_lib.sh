# Shared by the scripts that set up a tool in a venv of its own (setup_vllm.sh, setup_llmcompressor.sh); sourced.
# Needs VENV, PYTHON and TORCH_SPEC set by the caller.

fail() {
  echo "error: $*" >&2
  exit 1
}

# create_venv_with_cpu_torch SPEC: $VENV (created if missing) with pip upgraded, $TORCH_SPEC (the CPU wheel) installed
# first on its own, then SPEC with torch held at $TORCH_SPEC (left to SPEC's resolver, an unpinned torch pulls a
# multi-GB CUDA build). Wheels in /opt/wheels are used when present.
create_venv_with_cpu_torch() {
  local spec=$1 links=()
  mkdir -p "$(dirname "$VENV")" || fail "could not create the parent directory of $VENV"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || fail "could not create $VENV with $PYTHON (set PYTHON to a Python 3.10-3.13 with venv)"
  fi
  [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  "$VENV/bin/python" -m pip install --quiet --upgrade pip \
    || fail "could not upgrade pip in $VENV (no network to PyPI?)"
  "$VENV/bin/python" -m pip install --quiet "${links[@]}" "$TORCH_SPEC" \
    || fail "could not install $TORCH_SPEC (CPU) into $VENV; see pip's output above"
  "$VENV/bin/python" -m pip install --quiet "${links[@]}" "$spec" "$TORCH_SPEC" \
    || fail "could not install $spec into $VENV (needs PyPI and Linux x86_64 CPython 3.10-3.13); see pip's output"
}
