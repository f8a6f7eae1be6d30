#!/usr/bin/env bash
# Set up (if needed) and run the demo recipe on the shipped reference model; artifacts go to work/demo/.
# Extra arguments go to `moe-compress run`, e.g. --set work_dir=/tmp/demo --set export.compensation=refit
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moe-compress run recipes/demo.yaml "$@"
