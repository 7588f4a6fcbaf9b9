#!/usr/bin/env bash
# Stops the cluster up.sh started and undoes every host side effect: processes (by recorded
# PID, the cluster DNS's dnsmasq with it), containerd tasks and their shims, cni-* network
# namespaces, mounts under the run dir and the kubelet's dir, the bridge link, KUBE-*/CNI-*
# iptables chains (kube-proxy's and CNI's), the route_localnet sysctl kube-proxy sets,
# /var/lib/kubelet, /var/lib/cni and /var/log/pods. Idempotent: safe to run when nothing is up.
# KORD_K8S_KEEP_RUN=1 keeps the run dir (logs) after stopping.
set -uo pipefail
run="${KORD_K8S_RUN:-$HOME/.cache/kord/k8s-run}"
bridge="${KORD_K8S_BRIDGE:-kordbr0}"
sock="$run/containerd/containerd.sock"

log() { printf '[k8s-down %s] %s\n' "$(date +%T)" "$*" >&2; }

stop() { # stop NAME: TERM the recorded process group, KILL after 15 s
  local f="$run/pids/$1" pid i
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $1 (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 30; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# kubelet first so it restarts nothing; then the pods' tasks while containerd still runs.
stop kubelet
if [[ -S "$sock" ]] && [[ -f "$run/pids/containerd" ]] && kill -0 "$(cat "$run/pids/containerd")" 2>/dev/null; then
  for ns in k8s.io default; do
    for task in $(ctr -a "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
      ctr -a "$sock" -n "$ns" tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
    done
    for task in $(ctr -a "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        ctr -a "$sock" -n "$ns" tasks delete -f "$task" >/dev/null 2>&1 && break
        sleep 0.5
      done
    done
    for c in $(ctr -a "$sock" -n "$ns" containers ls -q 2>/dev/null); do
      ctr -a "$sock" -n "$ns" containers delete "$c" >/dev/null 2>&1 || true
    done
  done
fi
stop containerd
# Shims outlive containerd: any containerd-shim whose command line names this run dir.
for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $run/" 2>/dev/null); do
  log "killing leftover shim $pid"
  kill -KILL "$pid" 2>/dev/null || true
done
# Container processes left under runc's state (a shim killed before its task).
if [[ -d "$run/containerd/state" ]]; then
  for rs in "$run"/containerd/state/io.containerd.runtime.v2.task/*/*/; do
    [[ -d "$rs" ]] || continue
    runc --root "$run/containerd/runc/$(basename "$(dirname "$rs")")" kill "$(basename "$rs")" KILL >/dev/null 2>&1 || true
  done
fi
stop kube-proxy
stop cluster-dns
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd

# Network namespaces the CNI bridge plugin created for pods.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cni-'); do
  ip netns delete "$ns" 2>/dev/null || true
done
if ip link show "$bridge" >/dev/null 2>&1; then
  log "deleting bridge $bridge"
  ip link delete "$bridge" 2>/dev/null || true
fi
# veths left by pods whose netns died are removed with the netns; nothing else to do.

# iptables chains from kubelet (KUBE-*) and CNI (CNI-*): flush references, then the chains.
for ipt in iptables ip6tables; do
  command -v "$ipt" >/dev/null || continue
  for table in filter nat mangle; do
    rules="$("$ipt" -t "$table" -S 2>/dev/null)" || continue
    # Rules in built-in chains that jump to our chains, deleted by number from the last.
    for builtin in INPUT OUTPUT FORWARD PREROUTING POSTROUTING; do
      "$ipt" -t "$table" -L "$builtin" -n --line-numbers 2>/dev/null |
        awk '$2 ~ /^(KUBE-|CNI-)/ {print $1}' | sort -rn |
        while read -r num; do "$ipt" -t "$table" -D "$builtin" "$num" 2>/dev/null || true; done
    done
    chains="$(echo "$rules" | awk '/^-N (KUBE-|CNI-)/ {print $2}')"
    for chain in $chains; do "$ipt" -t "$table" -F "$chain" 2>/dev/null || true; done
    for chain in $chains; do "$ipt" -t "$table" -X "$chain" 2>/dev/null || true; done
  done
done

if [[ -f "$run/route_localnet" ]]; then
  sysctl -qw "net.ipv4.conf.all.route_localnet=$(cat "$run/route_localnet")" 2>/dev/null || true
fi

# Mounts: everything under the run dir and the kubelet's dir (which kubelet bind-mounts onto
# itself), deepest first.
for root in "$run" /var/lib/kubelet /run/containerd/io.containerd; do
  for _ in 1 2 3; do
    mapfile -t mounts < <(awk -v r="$root" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r)
    ((${#mounts[@]})) || break
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  done
done

rm -rf /var/lib/kubelet /var/lib/cni /var/log/pods /var/log/containers /var/lib/kord-e2e-pv
if [[ "${KORD_K8S_KEEP_RUN:-0}" == 1 ]]; then
  rm -rf "$run/containerd" "$run/etcd"
else
  rm -rf "$run"
fi
left="$(awk -v r="$run/" 'index($2, r) == 1' /proc/self/mounts | wc -l)"
if ((left)); then log "warning: $left mounts under $run remain"; exit 1; fi
log "down: nothing left"
