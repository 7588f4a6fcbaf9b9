#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, the Helm chart (lint and rendered output, through
# Helm's Go library from PyPI, installed into a venv on first use), unit tests, openraft's storage
# suite and the end-to-end tests on clusters of real `kord` processes on 127.0.0.1. The operator's
# API-server tests run when KORD_TEST_KUBECONFIG (or KORD_K8S_KUBECONFIG) names a cluster, and on
# the local Kubernetes that scripts/k8s/e2e.sh starts (last step).
# Build output goes to $CARGO_TARGET_DIR (default ~/.cache/kord/target, outside the clone) so
# repeated runs skip the ~15-minute RocksDB build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/deps.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kord/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "build"
cargo build --locked --workspace --all-targets

step "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "chart: helm lint --strict and rendered output == manifests/"
"$root/scripts/chart.sh" check

step "tests"
# e2e tests start clusters of real processes: two at a time is what 2 cores take calmly.
cargo test --locked --workspace -- --test-threads 2

step "kubernetes e2e (local single-node cluster; skips with the reason where it cannot run)"
# Builds Kubernetes 1.20.2 from Debian's source package once (~8 min, cached under
# ~/.cache/kord/k8s), starts it on loopback, imports offline images of this build, runs the
# suite (e2e/tests/k8s.rs) and then the operator's API-server tests on the same cluster, and
# always tears the cluster down.
"$root/scripts/k8s/e2e.sh" cargo test --locked -p kord-operator --test apiserver -- --test-threads 1 --nocapture
