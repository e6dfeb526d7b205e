# Sourced by the install scripts: the accelerator of this machine, decided as
# kubetune_runtime.vllm_launch.Accelerator documents. KUBETUNE_ACCELERATOR=cpu|cuda decides
# instead (exit 2 for any other value); else `cuda` when `nvidia-smi -L` lists a GPU (a driver
# without a GPU, or one that cannot reach it, lists none), else `cpu`.
accelerator() {
  if [[ -n "${KUBETUNE_ACCELERATOR:-}" ]]; then
    case "${KUBETUNE_ACCELERATOR,,}" in
      cpu|cuda) echo "${KUBETUNE_ACCELERATOR,,}"; return ;;
      *) echo "KUBETUNE_ACCELERATOR must be cpu or cuda, not '$KUBETUNE_ACCELERATOR'" >&2; exit 2 ;;
    esac
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo cuda
  else
    echo cpu
  fi
}
