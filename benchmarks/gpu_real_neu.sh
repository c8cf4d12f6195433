#!/usr/bin/env bash
# GPU check of what users run: the shipped stock and prototype R50-FPN configs (GroupNorm, from scratch: the
# GPU machine reaches no network, so no ImageNet weights), trained on the real NEU-DET images with mixed
# precision, evaluated on neu_val and neu_test, then inference throughput at batch 1 / 8 / 32 with AMP on and
# off. One GPU, at most 8 minutes in all. Writes $OUT/gpu_real_neu.json (default benchmarks/results/): per
# model the config, the schedule overrides, iterations, wall time, training images/s, a status ("ok",
# "timeout" or "failed (exit N)"; the log holds the traceback) and the neu_val / neu_test results; then the
# inference rows (gpu_inference.json from benchmarks/bench_inference.py).
#
#   bash ../shared/tools/device-pack.sh neu-det     # on the development machine: .device/ (Detectron2, data)
#   device run (carry .device):  <PREFIX printed by device-pack> bash benchmarks/gpu_real_neu.sh
#
# Environment: PY (python3), OUT (benchmarks/results), ITERS (1100 at batch 8: about 2.4 minutes per model on
# one H200 in float32), AMP (True), TRAIN_LIMIT (seconds per training, 200), WORKERS (6), EXTRA_OPTS (more
# config overrides), SKIP_INFERENCE (unset).
# The model, head and recipe come from the configs; the script only sets the schedule (ITERS, LR 0.02 with a
# 100-iteration warm-up, steps at 75% / 90%), the device, data workers, mixed precision and the test splits.
# On a machine without CUDA it refuses to run unless ALLOW_CPU=1 (the CPU smoke run of the script's logic).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
ITERS=${ITERS:-1100}
AMP=${AMP:-True}
TRAIN_LIMIT=${TRAIN_LIMIT:-200}
source benchmarks/gpu_env.sh gpu_real_neu
[ -d "$STEEL_FSD_DATASETS/neu-det" ] || { echo "gpu_real_neu: no $STEEL_FSD_DATASETS/neu-det" >&2; exit 2; }
SCHEDULE=(MODEL.DEVICE "$DEVICE" SOLVER.IMS_PER_BATCH 8 SOLVER.BASE_LR 0.02 SOLVER.MAX_ITER "$ITERS"
          SOLVER.STEPS "($((ITERS * 3 / 4)), $((ITERS * 9 / 10)))" SOLVER.WARMUP_ITERS $((ITERS < 100 ? ITERS / 2 : 100))
          SOLVER.CHECKPOINT_PERIOD "$ITERS" TEST.EVAL_PERIOD 0 DATALOADER.NUM_WORKERS "${WORKERS:-6}"
          SOLVER.AMP.ENABLED "$AMP" TEST.AMP.ENABLED "$AMP" DATASETS.TEST "('neu_val', 'neu_test')")
read -r -a EXTRA <<< "${EXTRA_OPTS:-}"  # more overrides, e.g. a smaller model for the CPU smoke run
SCHEDULE+=("${EXTRA[@]}")
rm -f "$OUT/gpu_runs.txt"
run() {  # name config [more overrides]
  local name=$1 cfg=$2; shift 2
  local start=$SECONDS status=ok
  rm -rf "output/gpu/$name"
  timeout "$TRAIN_LIMIT" "$PY" tools/train_net.py --config-file "$cfg" "${SCHEDULE[@]}" "$@" \
    OUTPUT_DIR "output/gpu/$name" > "$OUT/gpu_$name.log" 2>&1
  local rc=$?
  if [ $rc = 124 ]; then status=timeout; elif [ $rc != 0 ]; then status="failed (exit $rc)"; fi
  [ "$status" = ok ] || echo "gpu_real_neu: $name: $status (see $OUT/gpu_$name.log)" >&2
  printf '%s\t%s\t%s\t%s\n' "$name" "$cfg" "$((SECONDS - start))" "$status" >> "$OUT/gpu_runs.txt"
}
run stock configs/baselines/faster_rcnn_R50_FPN_scratch_GN_neu.yaml
run prototype configs/prototype/proto_R50_FPN_scratch_GN_neu.yaml
if [ -z "${SKIP_INFERENCE:-}" ]; then
  timeout 120 "$PY" benchmarks/bench_inference.py --device "$DEVICE" --gpu-check --out "$OUT/gpu_inference.json" \
    > "$OUT/gpu_inference.log" 2>&1 || echo "gpu_real_neu: inference benchmark exited $? (see $OUT/gpu_inference.log)" >&2
fi
"$PY" benchmarks/gpu_summary.py "$OUT" "$ITERS" "$AMP"
