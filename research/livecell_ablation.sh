#!/usr/bin/env bash
# Does copy-paste onto LIVECell backgrounds pay for itself? Equal-time runs with and without it, one per
# held-out annotated LIVECell field (fold), each fine-tuning small.pt at LIVECell's native scale; then
# every run is scored on its held-out field and on Usiigaci sets 41-45 (research/livecell_cv.py).
# Usage: taskset -c 0 bash research/livecell_ablation.sh [HOURS per run] [FOLDS]
# Figure: the card's LIVECell ablation (copy-paste vs not, per held-out field, at equal time).
set -euo pipefail
HOURS=${1:-0.33}
FOLDS=${2:-"MCF7_Phase_G4_2_02d16h00m_1 BT474_Phase_B3_2_02d12h00m_3"}
LC=../shared/data/livecell
for fold in $FOLDS; do
  for variant in real copypaste; do
    extra=()
    if [ "$variant" = copypaste ]; then
      extra=(--synthetic 60 --backgrounds "$LC/unlabelled" --cells 100-1200)
    fi
    livecell-ray train --data "$LC/annotated/livecell_coco_val.json" --images-dir "$LC/annotated/images" \
      --val "$fold" --model weights/small.pt --scale 1.0 --imgsz 704 --batch 4 --workers 0 --epochs 1000 \
      --time-hours "$HOURS" --device cpu --lr0 0.001 --project runs/ablation --name "${fold}_${variant}" "${extra[@]}"
  done
done
