#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy from Debian's
# `kubernetes` source package (1.20.2, Go dependencies vendored) and caches them under
# ${KORD_K8S_CACHE:-~/.cache/kord/k8s}/<version>/bin, so repeat runs skip the ~8-minute build.
# Also installs the Debian packages the local cluster needs (when root; otherwise it prints
# what to install and exits 2).
# Prints the bin directory on its last line of stdout.
set -euo pipefail

version="1.20.2"
cache="${KORD_K8S_CACHE:-$HOME/.cache/kord/k8s}"
bindir="$cache/$version/bin"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
# Packages for building (golang-go, rsync, make) and for running the cluster.
packages=(golang-go rsync make dpkg-dev etcd-server containerd runc containernetworking-plugins
  jq openssl iptables iproute2 mount util-linux kmod python3-venv conntrack dnsmasq-base)

log() { printf '[build-kubernetes %s] %s\n' "$(date +%T)" "$*" >&2; }

have_all_bins() {
  local b
  for b in "${bins[@]}"; do [[ -x "$bindir/$b" ]] || return 1; done
}

missing_packages() {
  local p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

install_packages() {
  local missing
  missing="$(missing_packages | tr '\n' ' ')"
  [[ -z "${missing// /}" ]] && return 0
  if [[ "$(id -u)" != 0 ]]; then
    log "not root: install these Debian packages first: $missing"
    exit 2
  fi
  log "installing: $missing"
  apt-get update -qq >&2
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
}

# deb-src entries without naming a mirror: a copy of the configured deb822 sources with
# Types: deb-src.
enable_deb_src() {
  local src=/etc/apt/sources.list.d/debian.sources dst=/etc/apt/sources.list.d/kord-deb-src.sources
  if [[ -f "$dst" ]]; then return 0; fi
  if [[ ! -f "$src" ]]; then
    log "no $src: add deb-src entries for Debian bookworm by hand"
    exit 2
  fi
  sed -e 's/^Types:.*/Types: deb-src/' "$src" >"$dst"
  apt-get update -qq >&2
}

install_packages

if have_all_bins; then
  log "cached: $bindir"
  echo "$bindir"
  exit 0
fi

work="$cache/src"
mkdir -p "$work"
cd "$work"
enable_deb_src
if ! ls kubernetes_*orig.tar.gz >/dev/null 2>&1; then
  log "apt-get source kubernetes"
  apt-get source --download-only kubernetes >&2
fi
orig="$(ls kubernetes_*orig.tar.gz | head -n1)"
tree="$work/tree"
if [[ ! -f "$tree/Makefile" ]]; then
  rm -rf "$tree" "$work/unpack"
  mkdir -p "$work/unpack"
  tar -xzf "$orig" -C "$work/unpack"
  mv "$work/unpack"/* "$tree"
  rmdir "$work/unpack"
fi

# Go 1.19 faults in the vendored modern-go/reflect2 1.0.1 on the first custom-resource
# create; Debian's 1.0.2 source replaces it.
if [[ ! -f "$tree/.kord-reflect2-fixed" ]]; then
  log "replacing vendored reflect2 with Debian's 1.0.2"
  rm -rf "$work/reflect2" && mkdir -p "$work/reflect2"
  (cd "$work/reflect2" && apt-get download golang-github-modern-go-reflect2-dev >&2)
  dpkg-deb -x "$work"/reflect2/golang-github-modern-go-reflect2-dev_*.deb "$work/reflect2/x"
  r2="$(dirname "$(find "$work/reflect2/x" -name reflect2.go | head -n1)")"
  [[ -n "$r2" && -f "$r2/reflect2.go" ]] || { log "reflect2 sources not found in the package"; exit 1; }
  vdir="$tree/vendor/github.com/modern-go/reflect2"
  rm -rf "$vdir" && mkdir -p "$vdir"
  find "$r2" -maxdepth 1 -type f ! -name '*_test.go' -exec cp {} "$vdir/" \;
  touch "$tree/.kord-reflect2-fixed"
fi

# Only what the cache lacks (a cache from before kube-proxy joined the list keeps the rest).
missing_bins=()
for b in "${bins[@]}"; do [[ -x "$bindir/$b" ]] || missing_bins+=("$b"); done
log "make ${missing_bins[*]} (about 8 minutes cold on 2 cores for all five)"
start=$(date +%s)
(
  cd "$tree"
  GOPATH="$tree/.go" GOPROXY=off CGO_ENABLED=0 \
    make WHAT="${missing_bins[*]/#/cmd/}" KUBE_GIT_VERSION="v$version" >&2
)
log "make took $(( $(date +%s) - start )) s"
mkdir -p "$bindir"
for b in "${missing_bins[@]}"; do
  install -m 0755 "$tree/_output/local/bin/linux/amd64/$b" "$bindir/$b"
done
have_all_bins
# The source tree and Go's outputs take about 2.6 GB; the binaries are all that is kept.
rm -rf "$work"
echo "$bindir"
