#!/usr/bin/env bash
# The test suite, from a fresh clone: bash scripts/test.sh [pytest arguments or test paths]
# Without a GPU, tests/conftest.py runs the Triton kernels in Triton's CPU interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh test

# No path given: testpaths in pyproject.toml makes it tests/. pytest exits 5 when no test ran;
# set -e turns that, like any failure, into a failed run.
.venv/bin/python -m pytest -q "$@"
