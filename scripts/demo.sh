#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on this machine: `modelship demo` builds a tiny
# model offline, serves it from a local S3 server through the runtime and vLLM, and asks it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/modelship demo "$@"
