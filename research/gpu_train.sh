#!/usr/bin/env bash
# The model card's GPU training as one prepared command: five runs side by side on one GPU for the same
# wall time each, on the same data and validation split (Usiigaci sets 41-45):
#   defaults          yolov8n-seg.yaml, plain ultralytics defaults        } ablation (a): recipe or not
#   recipe            yolov8n-seg.yaml, our recipe                        } ablation (b): copy-paste or not
#   recipe_copypaste  yolov8n-seg.yaml, our recipe + N copy-paste fields  }
#   big               yolov8s-seg.yaml, our recipe + copy-paste           -> weights/big.pt candidate
#   small_finetune    weights/small.pt fine-tuned, recipe + copy-paste    -> weights/small.pt candidate
# Every run is `livecell-ray train` (see weights/README.md); each best.pt is then scored with
# `livecell-ray evaluate` on the held-out sets.
#
#   bash research/gpu_train.sh HOURS [DATA] [SCALE]
#   HOURS: training time per run (they run at the same time); DATA: Usiigaci-layout mask folder
#   (default ../shared/data/usiigaci/train); SCALE: pixel-scale factor (default 0.5).
# Environment: SYNTH (copy-paste fields, default 120), WORKERS (loader processes per run, default 3),
# BATCH (default 16), RUNS (default all five), BIG_MODEL (default yolov8s-seg.yaml; weights/big.pt
# continues the shipped big model), MARGIN (seconds past HOURS before a run is stopped, 240).
# On a lent GPU machine without network, carry .whl-train (benchmarks/gpu_kit.sh) and the data packed
# by research/pack_gpu_data.py; results are packed into $OUT as runs.tar.part-* (15 MiB each).
# Figure: small.pt 0.343 and big.pt 0.389 (0.278 -> 0.389 in stage 3) held-out mask AP on sets 41-45 (card).
set -uo pipefail
cd "$(dirname "$0")/.."
H=${1:?hours per run}
DATA=${2:-../shared/data/usiigaci/train}
SCALE=${3:-0.5}
SYNTH=${SYNTH:-120}
WORKERS=${WORKERS:-3}
BATCH=${BATCH:-16}
BIG_MODEL=${BIG_MODEL:-yolov8s-seg.yaml}
RUNS=${RUNS:-defaults recipe recipe_copypaste big small_finetune}
# The carried wheels only where the packages are missing (a lent machine), never over an installed project.
if ! python3 -c "import ultralytics, zarr" 2>/dev/null && ls .whl-train/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl-train/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 RAY_USAGE_STATS_ENABLED=0 YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-/tmp/yolo-cfg}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: CPU"
PROJECT=runs/gpu
mkdir -p "$PROJECT"
COMMON=(--data "$DATA" --val set41,set42,set43,set44,set45 --scale "$SCALE" --imgsz 512 --batch "$BATCH"
        --workers "$WORKERS" --epochs 1000 --time-hours "$H" --project "$PROJECT" --seed 1)
CP=(--synthetic "$SYNTH")
# Hard stop: the time budget plus data preparation, the final validation and a margin.
LIMIT=$(python3 -c "print(int($H * 3600 + ${MARGIN:-240}))")
start() {  # name, extra args...
  local name=$1; shift
  timeout "$LIMIT" python3 -m livecell_ray.cli train "${COMMON[@]}" --name "$name" "$@" \
    > "$PROJECT/$name.log" 2>&1 &
}
for r in $RUNS; do
  case $r in
    defaults) start defaults --no-recipe ;;
    recipe) start recipe ;;
    recipe_copypaste) start recipe_copypaste "${CP[@]}" ;;
    big) start big "${CP[@]}" --model "$BIG_MODEL" ;;
    small_finetune) start small_finetune "${CP[@]}" --model weights/small.pt ;;
    *) echo "unknown run $r"; exit 2 ;;
  esac
done
wait
for r in $RUNS; do echo "== $r"; tail -n 4 "$PROJECT/$r.log"; done
# A run stopped by the hard limit keeps its optimizer state in best.pt: strip it (fp16, as ultralytics does).
python3 - "$PROJECT" <<'PY'
import sys
from pathlib import Path
from ultralytics.utils.torch_utils import strip_optimizer
for best in sorted(Path(sys.argv[1]).glob("*/weights/best.pt")):
    strip_optimizer(str(best))
    print(f"{best}: {best.stat().st_size / 2**20:.1f} MiB")
PY
if [ -n "${OUT:-}" ]; then
  files=()
  for r in $RUNS; do
    for f in "$PROJECT/$r.log" "$PROJECT/$r/weights/best.pt" "$PROJECT/$r/results.csv" "$PROJECT/$r/args.yaml" \
             "$PROJECT/$r-data/prepared.json"; do
      [ -f "$f" ] && files+=("$f")
    done
  done
  tar cf - "${files[@]}" | split -b 15m - "$OUT/runs.tar.part-"
  ls -la "$OUT"
fi
