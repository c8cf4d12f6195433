#!/usr/bin/env bash
# Issue 9's GPU check: the stock and the prototype R50-FPN (GroupNorm, from scratch: the device machine
# reaches no network, so no ImageNet weights) at 512 px on the real NEU-DET images, one GPU, at most
# 8 minutes in all. Writes $OUT/gpu_real_neu.json (default benchmarks/results/) with, per model, the
# config, overrides, iterations, wall time and the neu_val / neu_test mean rows.
#
#   mkdir -p .device/data && cp -r ../shared/data/neu-det .device/data/    # on the development machine
#   device run (carry .device):  bash benchmarks/gpu_real_neu.sh
#
# Needs a Python with torch (CUDA), Detectron2 and this package's requirements: PY (default python3).
# ITERS (default 1500 at batch 8) sizes each training to about 3 minutes on one H200; lower it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
ITERS=${ITERS:-1500}
export STEEL_FSD_DATASETS=${STEEL_FSD_DATASETS:-$PWD/.device/data}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"$PY" -c "import torch, detectron2; assert torch.cuda.is_available(), 'no CUDA device'" \
  || { echo "gpu_real_neu: needs torch with CUDA and Detectron2 in $PY" >&2; exit 2; }
[ -d "$STEEL_FSD_DATASETS/neu-det" ] || { echo "gpu_real_neu: no $STEEL_FSD_DATASETS/neu-det" >&2; exit 2; }
COMMON=(MODEL.DEVICE cuda MODEL.WEIGHTS "" INPUT.HARMONIZE.RESIZE 512 SOLVER.IMS_PER_BATCH 8 SOLVER.BASE_LR 0.02
        SOLVER.MAX_ITER "$ITERS" SOLVER.STEPS "($((ITERS * 3 / 4)), $((ITERS * 9 / 10)))" SOLVER.WARMUP_ITERS 100
        SOLVER.CHECKPOINT_PERIOD "$ITERS" TEST.EVAL_PERIOD 0 DATALOADER.NUM_WORKERS 6
        INPUT.HARMONIZE.CLAHE False INPUT.AUG.ROTATION False INPUT.AUG.CROP False INPUT.AUG.GAMMA False
        INPUT.AUG.NOISE False DATASETS.TEST "('neu_val', 'neu_test')")
run() {  # name config [overrides...]
  local name=$1 cfg=$2; shift 2
  local start=$SECONDS
  timeout 230 "$PY" tools/train_net.py --config-file "$cfg" "${COMMON[@]}" "$@" OUTPUT_DIR "output/gpu/$name" \
    > "$OUT/gpu_$name.log" 2>&1 || echo "gpu_real_neu: $name exited $? (see $OUT/gpu_$name.log)" >&2
  echo "$name $cfg $((SECONDS - start))" >> "$OUT/gpu_runs.txt"
}
rm -f "$OUT/gpu_runs.txt"
run stock configs/baselines/faster_rcnn_R50_FPN_scratch_GN_neu.yaml
run prototype configs/baselines/faster_rcnn_R50_FPN_scratch_GN_neu.yaml MODEL.ROI_HEADS.NAME PrototypeROIHeads \
    MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True DATALOADER.SAMPLER_TRAIN EpisodicClassSampler \
    DATALOADER.EPISODE_CLASSES 4 DATALOADER.EPISODE_IMAGES_PER_CLASS 2
"$PY" - "$OUT" "$ITERS" <<'EOF'
import json, pathlib, sys
out, iters = pathlib.Path(sys.argv[1]), int(sys.argv[2])
runs = []
for line in (out / "gpu_runs.txt").read_text().split("\n"):
    if not line.strip():
        continue
    name, cfg, wall = line.split()
    res = {"name": name, "config": cfg, "iterations": iters, "wall_s": int(wall)}
    metrics = pathlib.Path("output/gpu") / name / "metrics.json"
    last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.is_file() else {}
    for split in ("neu_val", "neu_test"):  # the final evaluation, as Detectron2's EvalHook logs it
        res[split] = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(split + "/")} or None
    runs.append(res)
(out / "gpu_real_neu.json").write_text(json.dumps({"benchmark": "gpu_real_neu", "runs": runs}, indent=1) + "\n")
print(json.dumps(runs, indent=1))
EOF
