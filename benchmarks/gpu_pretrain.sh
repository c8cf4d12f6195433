#!/usr/bin/env bash
# GPU pretraining of the CPU detector's ResNet-18 on every steel image we have (NEU-DET, X-SDD, magnetic tile and
# Severstal training splits; never a validation or test image, and never an image of the novel classes named in
# EXCLUDE), with image labels per dataset plus SimCLR, at batch 256 of 200-pixel views under bfloat16, for at
# most MINUTES of training. Writes $OUT/<NAME>.pth as an index plus pieces of at most 15 MiB (the device returns
# files of at most 16 MiB; read_weights_file joins them), <NAME>.pth.json (per-epoch loss, linear probes on
# neu_val and xsdd_val before and after) and the curve PNG. Then detectors start from it on CPU with
# MODEL.WEIGHTS $OUT/<NAME>.pth (the protocol files' PRETRAINED key).
#
#   bash ../shared/tools/device-pack.sh neu-det x-sdd magnetic-tile severstal   # on the development machine
#   device run (carry .device):  <PREFIX printed by device-pack> bash benchmarks/gpu_pretrain.sh
#
# Environment: PY (python3), OUT (benchmarks/results/pretrain_gpu), NAME (r18_steel_multi_rot1), EXCLUDE
# ("inclusion patches": rotation 1's novel classes; "" for none), EPOCHS (400: an upper bound, MINUTES decides),
# MINUTES (6.5), BATCH (256), CROP (200). On a machine without CUDA it refuses unless ALLOW_CPU=1 (the CPU smoke
# run: set small EPOCHS, BATCH, CROP and RESIZE).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results/pretrain_gpu}
NAME=${NAME:-r18_steel_multi_rot1}
EXCLUDE=${EXCLUDE-inclusion patches}
source benchmarks/gpu_env.sh gpu_pretrain
AMP=(--amp)
[ "$DEVICE" = cuda ] || AMP=()
DATASETS=()
for pair in neu-det:neu_train x-sdd:xsdd_train magnetic-tile:mt_train severstal:severstal_tiled_train; do
  [ -d "$STEEL_FSD_DATASETS/${pair%%:*}" ] && DATASETS+=("${pair#*:}")
done
[ ${#DATASETS[@]} -gt 0 ] || { echo "gpu_pretrain: no data set under $STEEL_FSD_DATASETS" >&2; exit 2; }
PROBES=()
for pair in neu-det:neu_val x-sdd:xsdd_val; do [ -d "$STEEL_FSD_DATASETS/${pair%%:*}" ] && PROBES+=("${pair#*:}"); done
read -r -a EXCL <<< "$EXCLUDE"
"$PY" tools/pretrain_backbone.py --config-file configs/baselines/faster_rcnn_R18_FPN_GN_neu_cpu.yaml \
  --datasets "${DATASETS[@]}" ${EXCL[@]:+--exclude-classes "${EXCL[@]}"} --method supervised+simclr \
  ${PROBES[@]:+--probe "${PROBES[@]}"} --epochs "${EPOCHS:-400}" --batch "${BATCH:-256}" --crop "${CROP:-200}" \
  --lr "${LR:-0.3}" --device "$DEVICE" "${AMP[@]}" --max-minutes "${MINUTES:-6.5}" --shard-mib 15 \
  --out "$OUT/$NAME.pth" INPUT.HARMONIZE.RESIZE "${RESIZE:-200}" MODEL.DEVICE "$DEVICE" 2>&1 | grep -v "it/s\]\|batch/s" | tail -n 60
status=${PIPESTATUS[0]}
rm -f "$OUT/$NAME.pth.state.pth"  # the resumable state (encoder + optimizer) is too large to bring back
ls -la "$OUT"
exit "$status"
