#!/usr/bin/env bash
# Install Debian's buildah (builds OCI images without a Docker engine: vfs storage, chroot
# isolation) and mmdebstrap (makes the local Debian base those builds start from), for
# scripts/build-images.sh and tests/integration/test_images.py. Skips the install when both are
# already on PATH. Recommends are kept: mmdebstrap uses mount and gpg, buildah crun for `run`.
set -euo pipefail
if command -v buildah >/dev/null && command -v mmdebstrap >/dev/null; then
  echo "buildah and mmdebstrap already installed: $(buildah --version), mmdebstrap $(mmdebstrap --version | cut -d' ' -f2)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "installing buildah and mmdebstrap from Debian (apt-get)..."
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y buildah mmdebstrap
buildah --version
