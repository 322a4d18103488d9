#!/usr/bin/env bash
# Build the product image with podman, offline-friendly: no registry and no TLS inside the build.
#   scripts/build-image.sh [TAG]             agent and gateway (default localhost/l7proxy:latest)
#   scripts/build-image.sh --gateway [TAG]   gateway only: no bcc, LLVM or kernel headers
#                                            (docker/Dockerfile.gateway; localhost/l7proxy-gateway:latest)
# 1. base: debootstrap --variant=minbase bookworm from the Debian mirror apt already uses, then
#    `podman import` as localhost/debian-base:bookworm (once; ~30 s);
# 2. wheelhouse: `pip wheel` of the project and its dependencies on the host into build/wheelhouse
#    (the build container installs them with `pip install --no-index --find-links`);
# 3. `podman build --from` the base; setup.sh --product installs only what the product needs.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKERFILE=docker/Dockerfile
DEFAULT_TAG=localhost/l7proxy:latest
if [ "${1:-}" = "--gateway" ]; then
  DOCKERFILE=docker/Dockerfile.gateway
  DEFAULT_TAG=localhost/l7proxy-gateway:latest
  shift
fi
case "${1:-}" in -*) printf 'build-image: unknown option %s (--gateway [TAG])\n' "$1" >&2; exit 2 ;; esac
TAG=${1:-$DEFAULT_TAG}
BASE=${L7PROXY_BASE_IMAGE:-localhost/debian-base:bookworm}
PY=${L7PROXY_PYTHON:-${L7PROXY_VENV:-$PWD/.venv}/bin/python}  # the interpreter whose pip makes wheels
PODMAN=(podman --runtime runc)

step() { printf 'build-image: %s\n' "$*"; }
die() { printf 'build-image: ERROR: %s\n' "$*" >&2; exit 1; }

command -v podman >/dev/null || die "podman is missing: make setup"
if "${PODMAN[@]}" image exists "$BASE"; then
  step "base image $BASE present"
else
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
  # The first Debian archive apt uses (deb822 "URIs:" or a one-line "deb URL"), comments skipped.
  MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -E '^(URIs:|deb) ' | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  step "debootstrap --variant=minbase bookworm from $MIRROR (about 30 s)"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null || die "debootstrap failed"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "${PODMAN[@]}" import -q - "$BASE" >/dev/null || die "podman import failed"
fi

step "wheelhouse: pip wheel of the project and its dependencies into build/wheelhouse"
"$PY" -m pip wheel -q -w build/wheelhouse . || die "pip wheel failed: check that PyPI is reachable from this host"

step "podman build $TAG from $DOCKERFILE (apt inside the build; pip from the wheelhouse only)"
"${PODMAN[@]}" build -q --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --from "$BASE" -f "$DOCKERFILE" -t "$TAG" . >/dev/null || die "podman build failed"
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")
step "built $TAG: $((size / 1024 / 1024)) MiB"
