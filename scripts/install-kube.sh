#!/usr/bin/env bash
# etcd (Debian's etcd-server) for the real Kubernetes control plane the tests start
# (tests/servers/kubeplane.py); the API server, controller manager and scheduler come from
# MODELSHIP_KUBE_ASSETS (../shared/kube). Skips the install when etcd is already on PATH.
set -euo pipefail
if command -v etcd >/dev/null; then
  echo "etcd already installed: $(etcd --version | sed -n 1p)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "installing etcd (Debian etcd-server) for the test control plane"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends etcd-server
# The package may start a system service; the tests run their own etcd on a free port.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  $SUDO systemctl stop etcd || true
fi
# sed, not head: head exits after one line and etcd, still writing, dies of SIGPIPE (exit 141 under
# pipefail), which failed a fresh machine's first setup now and then.
etcd --version | sed -n 1p
