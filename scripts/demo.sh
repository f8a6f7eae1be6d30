#!/usr/bin/env bash
# Set up (if needed) and run the demo on the shipped reference model; artifacts go to work/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=${WORK_DIR:-work/demo}
mkdir -p "$work"
domains=(-d code=demo:code -d math=demo:math -d legal=demo:legal -d english=demo:english -d french=demo:french -d german=demo:german)
.venv/bin/moe-compress profile models/reference "${domains[@]}" --max-tokens 32768 --seq-len 256 \
  -o "$work/profile.json" --overwrite
.venv/bin/moe-compress report "$work/profile.json" -o "$work/report"
echo "demo done: see $work/report/summary.md"
