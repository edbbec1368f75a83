#!/usr/bin/env bash
# Patched vs unpatched on the embedded SmolLM2-135M-Instruct: with no arguments, first one chat
# answer from each (examples/chat_compare.py), then the logits check and tokens/s (compare_tps.py).
# From a fresh clone: bash scripts/demo.sh [examples/compare_tps.py arguments, e.g. --shape llama3-8b]
# Arguments skip the chat: they are for a speed run, often of a random-weight shape with no text.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh demo

if [ $# -eq 0 ]; then
    .venv/bin/python examples/chat_compare.py
    echo
fi
.venv/bin/python examples/compare_tps.py "$@"
