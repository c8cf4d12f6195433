# Sourced by the benchmarks/gpu_*.sh scripts (after setting PY and OUT): the data folder, unbuffered output, the
# output folder, and DEVICE: cuda when $PY has torch with CUDA and Detectron2; otherwise the script stops with
# exit 2 unless ALLOW_CPU=1 (its CPU smoke run, DEVICE=cpu). $1: the script's name for the message.
export STEEL_FSD_DATASETS=${STEEL_FSD_DATASETS:-$PWD/.device/data}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
DEVICE=cuda
if ! "$PY" -c "import torch, detectron2; assert torch.cuda.is_available()" 2>/dev/null; then
  [ "${ALLOW_CPU:-0}" = 1 ] || { echo "$1: needs torch with CUDA and Detectron2 in $PY (ALLOW_CPU=1: smoke run on CPU)" >&2; exit 2; }
  DEVICE=cpu
fi
