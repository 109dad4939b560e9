#!/usr/bin/env bash
# The whole Sartorius chain of research/sartorius.py on this machine's CPU, resumable: run it again (in the
# background, e.g. `nohup bash research/sartorius.sh > runs/sartorius.log 2>&1 &`) and every finished run is
# skipped, a stopped one resumes from its last.pt. Snapshots go to weights/logs/sartorius after each run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PYTHONUNBUFFERED=1
S=research/sartorius.py
[ -d .gpu/lc ] || python research/pack_livecell_gpu.py .gpu
[ -d .sart/train ] || python $S pack
P=runs/sartorius${SARTORIUS_ARCH:+_$SARTORIUS_ARCH}
P=${P%_small}
mkdir -p $P
# SARTORIUS_ARCH=big PRE_CHUNK=2: big's chain, its pre-training committed every 2 epochs (weights/logs/sartorius_big)
L=weights/logs/sartorius${SARTORIUS_ARCH:+_$SARTORIUS_ARCH}
L=${L%_small}
python $S pretrain --epochs "${PRE_EPOCHS:-10}" --chunk "${PRE_CHUNK:-0}"
python $S snapshot
# held-out folds first (the cross-validation decides), f0 (holds nothing out: the candidate to ship) last
for f in ${FOLDS:-f1 f3 f5 f2 f4 f0}; do
  [ -f "$L/eval_$f.json" ] && continue  # scored in an earlier session
  python $S stage1 "$f" --epochs "${S1_EPOCHS:-30}"
  [ -f $P/eval_$f.json ] || python $S eval "$f"
  python $S snapshot
done
python $S table
