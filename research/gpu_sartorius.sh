#!/usr/bin/env bash
# Issue 31's stage 1 for `small` and `big` on every fold in one GPU call: the same runs as
# research/sartorius.sh (each from its committed Sartorius pre-training, 30 epochs, fixed schedule), all
# side by side on one GPU, then each scored on its fold's held-out LIVECell field and the held-out Sartorius
# SH-SY5Y fields. Folds already scored in weights/logs/sartorius*/ are skipped, as on the CPU, unless FORCE=1
# (`small`'s folds all ran on the CPU: FORCE=1 reruns them beside `big`'s, so both compare on one device).
#
# Here, once (the inputs, about 55 MiB with the tree):
#   bash benchmarks/gpu_kit.sh                                   # .whl-train (3.7 MiB)
#   python research/pack_livecell_gpu.py .gpu && SARTORIUS_ARCH=small python research/sartorius.py pack
#   bash benchmarks/gpu_travel.sh slim                           # the tracked weights stop travelling
#   bash benchmarks/gpu_travel.sh size $(bash research/gpu_sartorius.sh carry)
# The call (timeout_s 600), then here:
#   run(command="bash research/gpu_sartorius.sh", carry=<the paths `carry` prints>)
#   bash benchmarks/gpu_travel.sh restore
#   cat FILES_AT/s31.tar.part-* | tar xf - && for a in small big; do SARTORIUS_ARCH=$a python research/sartorius.py snapshot; done
# Environment: FORCE, ARCHS (default "small big"), FOLDS (default f1 f2 f3 f4 f5 f0), S1_EPOCHS (30), WORKERS
# (loader processes per run, default 1), LIMIT (seconds a run may take, default 400: a run that does not
# finish its epochs is reported, never scored or mixed with the finished ones).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = carry ]; then
  echo .whl-train .gpu/lc .gpu/usi .sart/shsy5y_held weights/logs/sartorius/pre/last.pt \
    weights/logs/sartorius_big/pre/last.pt
  exit 0
fi
ARCHS=${ARCHS:-small big}
FOLDS=${FOLDS:-f1 f2 f3 f4 f5 f0}
E=${S1_EPOCHS:-30}
if ! python3 -c "import ultralytics, pycocotools" 2>/dev/null && ls .whl-train/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl-train/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 SARTORIUS_WORKERS=${WORKERS:-1}
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-/tmp/yolo-cfg}
S=research/sartorius.py
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU: CPU"
dirs() { case $1 in small) echo runs/sartorius weights/logs/sartorius ;; *) echo runs/sartorius_$1 weights/logs/sartorius_$1 ;; esac; }
todo=()
for a in $ARCHS; do
  read -r P L <<< "$(dirs "$a")"
  mkdir -p "$P"
  for f in $FOLDS; do [ -z "${FORCE:-}" ] && [ -f "$L/eval_$f.json" ] || todo+=("$a:$f"); done
done
stamp "stage 1, $E epochs each, side by side: ${todo[*]}"
for t in "${todo[@]}"; do
  a=${t%:*} f=${t#*:}
  read -r P L <<< "$(dirs "$a")"
  SARTORIUS_ARCH=$a timeout "${LIMIT:-400}" python3 $S stage1 "$f" --epochs "$E" > "$P/$f.log" 2>&1 &
done; wait
stamp "scoring the runs that finished their $E epochs"
for t in "${todo[@]}"; do
  a=${t%:*} f=${t#*:}
  read -r P L <<< "$(dirs "$a")"
  n=$(($(wc -l 2>/dev/null < "$P/$f/results.csv" || echo 1) - 1))
  if [ "$n" -ge "$E" ]; then
    SARTORIUS_ARCH=$a timeout 150 python3 $S eval "$f" > "$P/$f.eval.log" 2>&1 &
  else
    echo "$a $f: $n of $E epochs in ${LIMIT:-400} s, not scored"
  fi
done; wait
for a in $ARCHS; do
  read -r P L <<< "$(dirs "$a")"
  SARTORIUS_ARCH=$a python3 $S table
done
stamp "done"
if [ -n "${OUT:-}" ]; then
  # Logs, scores and the f0 candidates, stripped (fp16, no optimizer: big's is 24 MB); the other folds'
  # figures are their scores.
  python3 -c "import sys; from ultralytics.utils.torch_utils import strip_optimizer as s; [s(p) for p in sys.argv[1:]]" \
    runs/sartorius*/f0/weights/last.pt 2>/dev/null
  files=()
  for a in $ARCHS; do
    read -r P L <<< "$(dirs "$a")"
    files+=("$P"/*.log "$P"/eval_*.json "$P"/f*/results.csv "$P"/f*/args.yaml "$P"/f0/weights/last.pt)
  done
  tar cf - "${files[@]}" 2>/dev/null | split -b 15m - "$OUT/s31.tar.part-"
  ls -la "$OUT"
fi
