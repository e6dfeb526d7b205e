#!/usr/bin/env bash
# On a CUDA workstation, add what local mode's trainer needs for the GPU beyond the `trainer`
# extra: the `qlora` extra (bitsandbytes' 4-bit kernels). The trainer's torch is PyPI's build,
# which is a CUDA build on Linux x86_64 (only this repository's CI disk holds a CPU one). On the
# CPU there is nothing to add: QLoRA is CUDA-only and jobs there train LoRA or full in fp32.
# DeepSpeed is left to the trainer image: one GPU has nothing to shard.
#
# The accelerator is decided as for vLLM (hack/accelerator.sh). Idempotent: exits at once when
# the project venv already imports bitsandbytes. KUBETUNE_INSTALL_DRY_RUN=1 prints the choice and
# installs nothing. PYTHON is the project venv's interpreter (the Makefile passes it).
set -euo pipefail

PYTHON="${PYTHON:-.venv/bin/python}"
# shellcheck source=hack/accelerator.sh
source "$(dirname "${BASH_SOURCE[0]}")/accelerator.sh"
ACCELERATOR="$(accelerator)"
if [[ "$ACCELERATOR" == cuda ]]; then
  EXTRAS="qlora"
else
  EXTRAS="none"
fi
if [[ "${KUBETUNE_INSTALL_DRY_RUN:-}" == 1 ]]; then
  echo "accelerator: $ACCELERATOR"
  echo "trainer extras: $EXTRAS"
  exit 0
fi
if [[ "$EXTRAS" == none ]]; then
  exit 0
fi
if "$PYTHON" -c "import bitsandbytes" >/dev/null 2>&1; then
  echo "the trainer's QLoRA kernels (bitsandbytes) are installed"
  exit 0
fi
echo "a CUDA GPU is listed: installing the trainer's QLoRA kernels (the qlora extra)"
"$PYTHON" -m pip install --quiet -e ".[$EXTRAS]"
"$PYTHON" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__, 'ready')"
