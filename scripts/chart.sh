#!/usr/bin/env bash
# Lints and renders charts/kord with Helm's Go library (PyPI helm-python-sdk, Python >= 3.10) and
# compares the output with manifests/. Installs the package into a venv (default
# ~/.cache/kord/venv) on first use.
#   scripts/chart.sh [check]   # lint --strict + rendered output == manifests/
#   scripts/chart.sh update    # rewrite manifests/ from the chart
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KORD_VENV:-$HOME/.cache/kord/venv}"
if ! "$venv/bin/python" -c 'import helm_python' 2>/dev/null; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
      apt-get install -y -q python3-venv >&2
    else
      echo "[chart] needs Python 3.10+ with venv: install python3 and python3-venv (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  echo "[chart] installing helm-python-sdk into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'helm-python-sdk>=0.2,<0.3'
fi
exec "$venv/bin/python" "$root/scripts/chart.py" "${1:-check}"
