#!/usr/bin/env bash
# The GPU benchmark as one prepared command, for a lent GPU machine without network.
# Once, on the development machine (repo root):   bash benchmarks/gpu_kit.sh
# Then run with `.whl` carried:   bash benchmarks/gpu.sh [N_FIELDS]
# It stops after the warm-up, printing the reason, if fields fail there (a missing package, say).
# On a normal GPU machine with the project installed, the same command works without .whl.
# A lent machine takes at most 64 MiB of working tree plus carried paths: the tracked tree (about 37 MB)
# and .whl (about 49 MB) only fit with weights/big.pt moved aside for the call (the benchmark uses small.pt);
# put it back before committing anything, or `git add -A` records its deletion.
# Output is unbuffered and the pipeline prints fields/s every 10 s, so a run cut short still reports.
set -euo pipefail
cd "$(dirname "$0")/.."
# The carried wheels only where the packages are missing (a lent machine), never over an installed project.
if ! python3 -c "import ray, ultralytics, zarr, ome_zarr" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
fi
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_bench.py --fields "${1:-2000}" --out "${OUT:-/tmp}/gpu_bench.json"
