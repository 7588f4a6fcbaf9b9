#!/usr/bin/env bash
# Starts a single-node Kubernetes 1.20 cluster on loopback from the binaries build-kubernetes.sh
# cached: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (CRI, CNI
# bridge), kubelet, kube-proxy (iptables) and a cluster DNS (scripts/k8s/dns.py: dnsmasq fed
# from the API, behind the kube-system/kube-dns Service), all under one run dir with recorded
# PIDs. The API server, DNS and kubelet listen on the pod bridge's gateway address (default
# 10.244.0.1), which the host and the pods both reach; nothing listens on other interfaces. Waits (bounded) until node1 is
# Ready and a smoke pod runs, then prints the kubeconfig path on its last stdout line.
# Idempotent: a cluster already up is reused. Undo everything with down.sh.
#
# Environment: KORD_K8S_RUN (run dir, default ~/.cache/kord/k8s-run), KORD_K8S_BIN (k8s binaries;
# default: build-kubernetes.sh's cache), KORD_K8S_PORT_BASE (default 31000: etcd +379/+380,
# apiserver +443, kubelet +250/+248, controller-manager +257, scheduler +259, kube-proxy
# +256/+249), KORD_K8S_POD_CIDR (a /24, default 10.244.0.0/24; its .1 is the gateway).
# Needs root and the packages build-kubernetes.sh installs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run="${KORD_K8S_RUN:-$HOME/.cache/kord/k8s-run}"
base="${KORD_K8S_PORT_BASE:-31000}"
etcd_port=$((base + 379)) etcd_peer=$((base + 380)) api_port=$((base + 443))
kubelet_port=$((base + 250)) kubelet_health=$((base + 248))
cm_port=$((base + 257)) sched_port=$((base + 259))
proxy_health=$((base + 256)) proxy_metrics=$((base + 249))
pod_cidr="${KORD_K8S_POD_CIDR:-10.244.0.0/24}"
gw="${pod_cidr%.*/*}.1"
service_cidr=10.0.0.0/24 api_service_ip=10.0.0.1 dns_service_ip=10.0.0.10 domain=cluster.local
bridge="${KORD_K8S_BRIDGE:-kordbr0}"
kubeconfig="$run/kubeconfig"
sock="$run/containerd/containerd.sock"

log() { printf '[k8s-up %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ "$(id -u)" == 0 ]] || die "needs root (kubelet, containerd, CNI); run as root or use scripts/kind/run-e2e.sh"

bin="${KORD_K8S_BIN:-}"
if [[ -z "$bin" ]]; then
  bin="$("$here/build-kubernetes.sh" | tail -n1)"
fi
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
  [[ -x "$bin/$b" ]] || die "missing $bin/$b (run scripts/k8s/build-kubernetes.sh)"
done
for b in etcd containerd runc ctr openssl iptables ip conntrack dnsmasq python3; do
  command -v "$b" >/dev/null || die "missing $b (run scripts/k8s/build-kubernetes.sh as root to install it)"
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
  die "missing CNI plugins in /usr/lib/cni (Debian: containernetworking-plugins)"
kubectl="$("$here/tools.sh" kubectl)"

mkdir -p "$run"/{pids,logs,pki,etcd,containerd,cni/net.d,cni/ipam,dns}

running() { # running NAME: the recorded process is alive
  local f="$run/pids/$1"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

start() { # start NAME CMD...: background it, record its PID, keep its log
  local name="$1"
  shift
  if running "$name"; then
    log "$name already running (pid $(cat "$run/pids/$name"))"
    return 0
  fi
  log "starting $name"
  setsid "$@" >"$run/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$run/pids/$name"
}

wait_for() { # wait_for SECONDS WHAT CMD...: poll CMD every 0.5 s until it succeeds
  local limit="$1" what="$2" deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${limit}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

check_alive() { # after a failed wait: name the dead process and show its log's tail
  local n
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy cluster-dns; do
    if [[ -f "$run/pids/$n" ]] && ! running "$n"; then
      log "$n exited; last lines of $run/logs/$n.log:"
      tail -n 20 "$run/logs/$n.log" >&2 || true
    fi
  done
}
fail() { check_alive; die "$*"; }

# --- the pod bridge, made before the CNI plugin would, so the API server can listen on it -----
if ! ip link show "$bridge" >/dev/null 2>&1; then
  ip link add "$bridge" type bridge
fi
ip addr show dev "$bridge" | grep -q "inet $gw/" || ip addr add "$gw/${pod_cidr#*/}" dev "$bridge"
ip link set "$bridge" up
# kube-proxy sets route_localnet; down.sh puts back the value found here.
[[ -f "$run/route_localnet" ]] || cat /proc/sys/net/ipv4/conf/all/route_localnet >"$run/route_localnet"

# --- credentials -----------------------------------------------------------------------------
# A CA of our own signs the API server's certificate, so pods verify it (ca.crt in their
# service-account secret) when they reach it as https://10.0.0.1 or kubernetes.default.svc.
if [[ ! -f "$run/pki/apiserver.crt" ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=kord-k8s-ca \
    -keyout "$run/pki/ca.key" -out "$run/pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
    -keyout "$run/pki/apiserver.key" -out "$run/pki/apiserver.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:$api_service_ip,IP:$gw,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$domain" \
    >"$run/pki/apiserver.ext"
  openssl x509 -req -in "$run/pki/apiserver.csr" -CA "$run/pki/ca.crt" -CAkey "$run/pki/ca.key" \
    -CAcreateserial -days 3650 -extfile "$run/pki/apiserver.ext" -out "$run/pki/apiserver.crt" 2>/dev/null
fi
if [[ ! -f "$run/pki/sa.key" ]]; then
  openssl genrsa -out "$run/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$run/pki/sa.key" -pubout -out "$run/pki/sa.pub" 2>/dev/null
fi
if [[ ! -f "$run/pki/token.csv" ]]; then
  token="$(openssl rand -hex 16)"
  echo "$token,admin,admin,system:masters" >"$run/pki/token.csv"
  chmod 600 "$run/pki/token.csv"
fi
token="$(cut -d, -f1 "$run/pki/token.csv")"
cat >"$kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$gw:$api_port
    certificate-authority: $run/pki/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
KC
chmod 600 "$kubeconfig"

# --- control plane -------------------------------------------------------------------------
start etcd etcd --name kord-k8s --data-dir "$run/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "kord-k8s=http://127.0.0.1:$etcd_peer" --listen-metrics-urls ""
wait_for 30 etcd curl -sf "http://127.0.0.1:$etcd_port/health" || fail "etcd did not start"

start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address "$gw" --secure-port "$api_port" --advertise-address "$gw" --insecure-port 0 \
  --tls-cert-file "$run/pki/apiserver.crt" --tls-private-key-file "$run/pki/apiserver.key" \
  --client-ca-file "$run/pki/ca.crt" --kubelet-preferred-address-types InternalIP --token-auth-file "$run/pki/token.csv" --authorization-mode RBAC \
  --service-account-key-file "$run/pki/sa.pub" --service-account-signing-key-file "$run/pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc \
  --service-cluster-ip-range "$service_cidr" \
  --allow-privileged=true --profiling=false
wait_for 90 kube-apiserver "$kubectl" --kubeconfig "$kubeconfig" get --raw /readyz ||
  fail "kube-apiserver not ready"

start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$kubeconfig" \
  --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$cm_port" --port 0 --leader-elect=false \
  --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle' \
  --service-account-private-key-file "$run/pki/sa.key" --use-service-account-credentials=false \
  --root-ca-file "$run/pki/ca.crt"
start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$kubeconfig" \
  --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$sched_port" --port 0 --leader-elect=false
# iptables mode; --masquerade-all so replies to Service traffic come back through the host
# whether or not bridged traffic passes iptables (br_netfilter); conntrack sysctls left alone.
start kube-proxy "$bin/kube-proxy" --kubeconfig "$kubeconfig" --hostname-override node1 \
  --proxy-mode iptables --masquerade-all --cluster-cidr "$pod_cidr" --bind-address 127.0.0.1 \
  --healthz-bind-address "127.0.0.1:$proxy_health" --metrics-bind-address "127.0.0.1:$proxy_metrics" \
  --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0 \
  --oom-score-adj 0

# --- cluster DNS: dnsmasq on the gateway, fed from the API, behind kube-system/kube-dns --------
start cluster-dns python3 "$here/dns.py" "https://$gw:$api_port" "$run/pki/token.csv" \
  "$run/pki/ca.crt" "$gw" "$domain" "$run/dns"
k() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }
wait_for 60 "namespace kube-system" k get namespace kube-system || fail "no kube-system namespace"
k apply -f - >/dev/null <<DNS
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_service_ip
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: v1
kind: Endpoints
metadata: {name: kube-dns, namespace: kube-system}
subsets:
- addresses: [{ip: "$gw"}]
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
DNS
# Through the Service (kube-proxy) to dnsmasq (cluster-dns): both work once this answers.
wait_for 60 "cluster DNS through the kube-dns Service" \
  python3 "$here/dns.py" resolve "$dns_service_ip" "kubernetes.default.svc.$domain" ||
  fail "kubernetes.default.svc.$domain does not resolve through $dns_service_ip"

# --- node: containerd + CNI + kubelet ------------------------------------------------------
cat >"$run/cni/net.d/10-kord.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "kord-k8s",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$run/cni/ipam",
        "ranges": [[{"subnet": "$pod_cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
CNI
cat >"$run/containerd/config.toml" <<TOML
version = 2
root = "$run/containerd/root"
state = "$run/containerd/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$run/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$run/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "kord.local/pause:1"
  # These machines lack CAP_SYS_RESOURCE: without this runc fails writing oom_score_adj.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$run/cni/net.d"
TOML
start containerd containerd --config "$run/containerd/config.toml"
wait_for 30 containerd ctr -a "$sock" version || fail "containerd did not start"

# The sandbox image must be there before kubelet creates a pod.
if ! ctr -a "$sock" -n k8s.io images ls -q | grep -qx 'kord.local/pause:1'; then
  KORD_K8S_RUN="$run" "$here/image.sh" pause >/dev/null
fi

start kubelet "$bin/kubelet" --kubeconfig "$kubeconfig" \
  --container-runtime remote --container-runtime-endpoint "unix://$sock" \
  --cgroup-driver cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
  --fail-swap-on=false --hostname-override node1 --node-ip "$gw" --address "$gw" \
  --cluster-dns "$dns_service_ip" --cluster-domain "$domain" \
  --port "$kubelet_port" --healthz-port "$kubelet_health" --healthz-bind-address 127.0.0.1 \
  --read-only-port 0 --authorization-mode AlwaysAllow --authentication-token-webhook=false \
  --eviction-hard= --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
  --pod-infra-container-image kord.local/pause:1 --serialize-image-pulls=false \
  --max-pods 110 --pod-cidr "$pod_cidr"

wait_for 90 "node1 to register" k get node node1 || fail "node1 did not register"
# The node-lifecycle controller is off, so nobody else removes this taint.
k taint nodes node1 node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
wait_for 120 "node1 Ready" k wait --for=condition=Ready node/node1 --timeout=5s || fail "node1 not Ready"
k taint nodes node1 node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
wait_for 60 "default service account" k get serviceaccount default -n default ||
  fail "no default service account (controller-manager?)"

# --- smoke pod -----------------------------------------------------------------------------
k delete pod kord-smoke -n default --ignore-not-found --wait=true >/dev/null
k apply -f - >/dev/null <<POD
apiVersion: v1
kind: Pod
metadata: {name: kord-smoke, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: sleep
    image: kord.local/pause:1
    imagePullPolicy: Never
POD
wait_for 90 "smoke pod Running" k wait --for=condition=Ready pod/kord-smoke -n default --timeout=5s ||
  { k describe pod kord-smoke -n default >&2 || true; fail "smoke pod did not run"; }
k delete pod kord-smoke -n default --wait=false >/dev/null
log "cluster up: KUBECONFIG=$kubeconfig"
echo "$kubeconfig"
