#!/usr/bin/env bash
# Patched vs unpatched on the embedded SmolLM2-135M-Instruct: logits check, then tokens/s.
# From a fresh clone: bash scripts/demo.sh [examples/compare_tps.py arguments, e.g. --shape llama3-8b]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh demo

.venv/bin/python examples/compare_tps.py "$@"
