#!/usr/bin/env bash
# CPU experiment: does a longer stage 1 help the dense held-out MCF7 field? Fold f5 of research/gpu_livecell.sh
# (MCF7_Phase_G4_2_02d16h00m_1 held out), trained from the same base model on the same data for 1.5 h on this
# project's 2-core CPU (53 epochs, against 30 in the GPU call's stage 1), then scored once on the held-out field.
# Needs .gpu/ from research/pack_livecell_gpu.py. Result: weights/README.md; logs in weights/logs/cpu_f5_long/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 YOLO_CONFIG_DIR=/tmp/yolo-cfg OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
S=research/livecell_student.py; P=runs/lc_student; F=MCF7_Phase_G4_2_02d16h00m_1
mkdir -p $P
python3 $S data f5-cpulong $F > $P/f5-cpulong.data.log 2>&1
python3 $S train f5-cpulong .gpu/base.pt 1.5 --workers 1 --lr0 1e-3 > $P/f5-cpulong.log 2>&1
python3 $S eval $P/f5-cpulong/weights/last.pt $F $P/eval_f5-cpulong.json | tee $P/f5-cpulong.eval.log
