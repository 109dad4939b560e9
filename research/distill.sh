#!/usr/bin/env bash
# Every fold of research/distill.py on this machine's CPU, resumable: run it again and every scored fold is
# skipped, a stopped stage 1 resumes from its last.pt (runs/distill). `big`'s fold models (the teachers) must
# be on this machine: research/sartorius.sh with SARTORIUS_ARCH=big leaves them in runs/sartorius_big.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PYTHONUNBUFFERED=1
unset SARTORIUS_ARCH
D=research/distill.py
[ -d .gpu/lc ] || python research/pack_livecell_gpu.py .gpu
for f in ${FOLDS:-f1 f3 f5 f2 f4 f0}; do
  [ -f "weights/logs/distill/eval_$f.json" ] && continue  # scored in an earlier session
  python $D stage1 "$f"
  [ -f "runs/distill/eval_$f.json" ] || python $D eval "$f"
  python $D snapshot
done
python $D table
