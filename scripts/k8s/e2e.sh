#!/usr/bin/env bash
# The Kubernetes end-to-end suite on a local single-node cluster (CI's path; users with Docker
# use scripts/kind/run-e2e.sh): build-kubernetes (cached) -> up -> images -> suite -> down.
# The cluster is always torn down (trap), leaving no processes, mounts, netns, bridge or
# iptables chains behind.
#
#   scripts/k8s/e2e.sh                 # the suite (cargo test -p kord-e2e --test k8s)
#   scripts/k8s/e2e.sh CMD [ARGS...]   # also runs CMD with KORD_K8S_KUBECONFIG etc. exported,
#                                      # after the suite (e.g. the operator's apiserver tests)
#
# Skips (exit 0, "skipped: ..." on stdout) where the machine cannot run a cluster: not root, or
# the Debian packages cannot be installed. KORD_K8S_OPTIONAL=1 also turns a cluster that fails
# to come up into a skip (the suite's own failures always fail).
# KORD_IMAGE_PROFILE=debug|release (default debug: reuses scripts/test.sh's build).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kord/target}"
export KORD_IMAGE_PROFILE="${KORD_IMAGE_PROFILE:-debug}"
export KORD_K8S_RUN="${KORD_K8S_RUN:-$HOME/.cache/kord/k8s-run}"

t0=$SECONDS
timings=()
phase_start=$SECONDS
phase() { # phase NAME: closes the previous phase's timer
  timings+=("$1 $((SECONDS - phase_start))s")
  phase_start=$SECONDS
}
summary() { printf '[k8s-e2e] timings: %s; total %ss\n' "$(IFS=,; echo "${timings[*]}")" "$((SECONDS - t0))"; }
skip() { echo "skipped: kubernetes e2e: $*"; exit 0; }
infra_fail() {
  if [[ "${KORD_K8S_OPTIONAL:-0}" == 1 ]]; then skip "$*"; fi
  echo "kubernetes e2e: $*" >&2
  exit 1
}

[[ "$(id -u)" == 0 ]] || skip "needs root to run kubelet and containerd (not root here)"
command -v apt-get >/dev/null || skip "no apt-get: not a Debian machine (use scripts/kind/run-e2e.sh)"

out="$("$here/build-kubernetes.sh")"
brc=$?
bin="$(tail -n1 <<<"$out")"
case "$brc" in
  0) ;;
  2) skip "the packages the local cluster needs cannot be installed here" ;;
  *) infra_fail "building Kubernetes failed" ;;
esac
phase build-kubernetes

cleanup() {
  local rc=$?
  KORD_K8S_KEEP_RUN="${KORD_K8S_KEEP_RUN:-0}" "$here/down.sh" || rc=1
  phase down
  summary
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kubeconfig="$(KORD_K8S_BIN="$bin" "$here/up.sh" | tail -n1)"
[[ -f "$kubeconfig" ]] || infra_fail "the cluster did not come up (logs in $KORD_K8S_RUN/logs)"
phase up

profile_flag=()
[[ "$KORD_IMAGE_PROFILE" == release ]] && profile_flag=(--release)
# The same command as scripts/test.sh's build (other target selections unify features
# differently and rebuild much of the tree): a no-op after it.
cargo build --locked --workspace --all-targets "${profile_flag[@]}" || exit 1
phase cargo-build
images="$("$here/image.sh" all)" || exit 1
echo "$images"
phase images

eval "$("$here/tools.sh" env)"
export KORD_K8S_KUBECTL KORD_K8S_HELM
export KORD_K8S_KUBECONFIG="$kubeconfig"
export KORD_K8S_IMAGE="$(awk '$1 ~ /\/kord:/ {print $1}' <<<"$images")"
export KORD_K8S_SAMPLE_IMAGE="$(awk '$1 ~ /\/kord-k8s-sample:/ {print $1}' <<<"$images")"
# The helm-upgrade step rolls the members onto a second tag of the same image.
export KORD_K8S_UPGRADE_TAG="${KORD_K8S_IMAGE##*:}-upgrade"
ctr -a "$KORD_K8S_RUN/containerd/containerd.sock" -n k8s.io images tag --force \
  "$KORD_K8S_IMAGE" "${KORD_K8S_IMAGE%:*}:$KORD_K8S_UPGRADE_TAG" >/dev/null || exit 1
op="$(awk '$1 ~ /\/kord-operator:/ {print $1}' <<<"$images")"
[[ -n "$op" ]] && export KORD_K8S_OPERATOR_IMAGE="$op"
export KORD_K8S_POD_LOG_DIR=/var/log/pods
# The node is this machine: the suite may touch the hostPath volumes it made (wiped-disk step).
export KORD_K8S_NODE_IS_LOCAL=1
rc=0
cargo test --locked -p kord-e2e --test k8s -- --test-threads 1 --nocapture || rc=1
phase suite
if (($#)); then
  "$@" || rc=1
  phase "$(basename "$1")"
fi
exit "$rc"
