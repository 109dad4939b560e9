#!/usr/bin/env bash
# LIVECell noisy student, cross-validated, in one GPU call (research/livecell_student.py says what each
# stage is): 6 folds (each annotated field held out once, and 'all'), stage 1 side by side, then both
# stage-2 variants of every fold side by side at equal time, then every fold's held-out field scored.
#
#   python research/pack_livecell_gpu.py .gpu       # here: the inputs, about 21 MiB
#   bash research/gpu_livecell.sh                   # there (carry .gpu and .whl-train), or here on a CPU
# Environment: T1, T2 (hours of stage 1 and 2, default 0.045 each: the whole call about 8 minutes), FOLDS (default all six), W1, W2 (loader
# processes per run in stage 1 and 2, default 2 and 1), END (seconds by which stage 2 ends, default 470).
# Results: runs/lc_student/ (per run: results.csv, args.yaml, last.pt; eval_*.json), packed into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
T1=${T1:-0.045}
T2=${T2:-0.045}
W1=${W1:-2}
W2=${W2:-1}
FOLDS=${FOLDS:-"all BT474_Phase_B3_2_02d12h00m_3 BT474_Phase_C3_1_01d04h00m_4 Huh7_Phase_A10_1_02d12h00m_3 MCF7_Phase_F4_2_00d00h00m_4 MCF7_Phase_G4_2_02d16h00m_1"}
if ! python3 -c "import ultralytics, pycocotools" 2>/dev/null && ls .whl-train/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl-train/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-/tmp/yolo-cfg}
S=research/livecell_student.py
P=runs/lc_student
mkdir -p $P
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU: CPU"
idx=0; declare -A FOLD
for f in $FOLDS; do FOLD[f$idx]=$f; idx=$((idx + 1)); done
# A run is stopped at its budget plus this margin (start-up, the final check) whatever happens; the epoch
# it was in is lost, not the run: last.pt is written after every epoch.
limit() { python3 -c "print(int($1 * 3600 + 50))"; }

stamp "stage 1 data"
for k in "${!FOLD[@]}"; do timeout 60 python3 $S data "$k-stage1" "${FOLD[$k]}" > $P/$k-stage1.data.log 2>&1 & done; wait
stamp "stage 1 training, $T1 h each"
for k in "${!FOLD[@]}"; do
  timeout "$(limit "$T1")" python3 $S train "$k-stage1" .gpu/base.pt "$T1" --workers "$W1" --lr0 1e-3 \
    > $P/$k-stage1.log 2>&1 &
done; wait
stamp "pseudo-labels from each fold's stage 1"
for k in "${!FOLD[@]}"; do
  timeout 90 python3 $S pseudo $P/$k-stage1/weights/last.pt $P/$k-pseudo-fields > $P/$k-pseudo.log 2>&1 &
done; wait
grep -h "cells kept" $P/*-pseudo.log
stamp "stage 2 data"
for k in "${!FOLD[@]}"; do
  cp -r $P/$k-stage1-data $P/$k-real-data
  timeout 60 python3 $S data "$k-pseudo" "${FOLD[$k]}" --pseudo $P/$k-pseudo-fields > $P/$k-pseudo.data.log 2>&1 &
done; wait
# Stage 2 ends by END seconds after the start whatever stage 1 cost, so that scoring and packing fit the call.
T2=$(python3 -c "print(round(min($T2, ((${END:-470} - $(date +%s) + $t0) - 40) / 3600), 4))")
stamp "stage 2 training, $T2 h each, both variants"
for k in "${!FOLD[@]}"; do
  for v in real pseudo; do
    timeout "$(limit "$T2")" python3 $S train "$k-$v" $P/$k-stage1/weights/last.pt "$T2" --workers "$W2" \
      --lr0 7e-4 > $P/$k-$v.log 2>&1 &
  done
done; wait
stamp "scoring every run on its fold's held-out field"
for k in "${!FOLD[@]}"; do
  for v in stage1 real pseudo; do
    timeout 60 python3 $S eval $P/$k-$v/weights/last.pt "${FOLD[$k]}" $P/eval_$k-$v.json > $P/$k-$v.eval.log 2>&1 &
  done
done; wait
grep -h "mask AP" $P/*.eval.log | sort
stamp "done"
# A run stopped by its limit keeps the optimizer in last.pt: strip it (fp16), as ultralytics does.
python3 - $P <<'PY'
import sys
from pathlib import Path
from ultralytics.utils.torch_utils import strip_optimizer
for last in sorted(Path(sys.argv[1]).glob("*/weights/last.pt")):
    strip_optimizer(str(last))
PY
if [ -n "${OUT:-}" ]; then
  # Two archives within the 64 MiB that come back: everything but weights, plus the 'all' fold's
  # weights (the shipped candidates); then the folds' control weights, to rescore here if need be.
  a=($P/*.log $P/eval_*.json $P/*/results.csv $P/*/args.yaml $P/*-data/prepared.json $P/*-pseudo-fields/summary.json)
  for k in "${!FOLD[@]}"; do [ "${FOLD[$k]}" = all ] && a+=($P/$k-*/weights/last.pt); done
  tar cf - "${a[@]}" 2>/dev/null | split -b 15m - "$OUT/main.tar.part-"
  b=(); for k in "${!FOLD[@]}"; do [ "${FOLD[$k]}" != all ] && b+=($P/$k-real/weights/last.pt); done
  tar cf - "${b[@]}" 2>/dev/null | split -b 15m - "$OUT/folds.tar.part-"
  ls -la "$OUT"
fi
