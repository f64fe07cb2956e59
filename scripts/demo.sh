#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on this machine: `modelship demo` builds a tiny
# model offline, serves it from a local S3 server through the runtime and vLLM, and asks it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n==> demo: modelship demo %s\n' "$*"
status=0
.venv/bin/modelship demo "$@" || status=$?
cat <<'HINT'

==> modelship is installed in .venv, not on your PATH. Run it as
      .venv/bin/modelship plan -f manifests/examples/llama-3.1-8b-bf16.yaml
    or put it on your PATH for this shell first:
      source .venv/bin/activate
      modelship --help
HINT
exit "$status"
