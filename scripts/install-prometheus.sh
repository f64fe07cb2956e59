#!/usr/bin/env bash
# Install Prometheus and promtool from Debian (for tests/servers/prometheus.py and the rule tests).
# Skips the install when both are already on PATH.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  echo "prometheus and promtool already installed: $(prometheus --version 2>&1 | sed -n 1p)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends prometheus
# The package starts a system service on some hosts; the tests run their own instance.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl stop prometheus || true
fi
prometheus --version 2>&1 | sed -n 1p
