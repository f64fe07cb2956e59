#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: lint, format, types, and the whole test suite
# (unit tests of the pure core, then integration tests against real local servers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
MYPYPATH=.dev mypy -p modelship.operator -p modelship.runtime
pytest "$@"
