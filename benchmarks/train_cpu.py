"""CPU training speed: ultralytics' thread default against `livecell-ray train`'s, side by side.

    python benchmarks/train_cpu.py [--fields 16] [--epochs 3] [--pairs 2]

ultralytics trains a CPU on min(8, cores - 1) threads (it keeps a core for data loading, then loads
data in the main process on a CPU anyway): one thread of two on a 2-core machine. `livecell_ray.training.train`
gives the run every core. This trains yolov8n-seg.yaml on a few real Usiigaci fields (imgsz 320,
batch 8, our recipe) both ways, alternating, and prints seconds per epoch and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
USIIGACI = ROOT.parent / "shared" / "data" / "usiigaci" / "train"


def epoch_seconds(results: Path) -> list[float]:
    """Per-epoch wall seconds from ultralytics' results.csv (its `time` column is cumulative)."""
    with results.open() as f:
        t = [float(r["time"]) for r in csv.DictReader(f)]
    return [b - a for a, b in zip([0.0, *t], t)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2)
    a = ap.parse_args()
    if not USIIGACI.exists():
        raise SystemExit(f"needs the Usiigaci fields at {USIIGACI}")
    from livecell_ray import offline

    offline.configure()
    import os

    import torch

    from livecell_ray.training import train as train_mod

    ours = train_mod._use_every_core
    tmp = Path(tempfile.mkdtemp(prefix="lcr-train-bench-"))
    names = sorted(p.name for p in USIIGACI.iterdir() if p.is_dir())[: a.fields + 1]
    (tmp / "src").mkdir()
    for name in names:  # the first fields train, the last one validates
        (tmp / "src" / name).symlink_to(USIIGACI / name)
    data = train_mod.prepare_dataset(train_mod.DataConfig(data=str(tmp / "src"), out=str(tmp / "ds"),
                                                          val=(names[-1],), scale=0.5))
    cores = len(os.sched_getaffinity(0))
    per_epoch: dict[str, list[float]] = {"ultralytics default": [], "livecell-ray": []}
    for pair in range(a.pairs):
        for arm in per_epoch:
            train_mod._use_every_core = ours if arm == "livecell-ray" else (lambda trainer: None)
            cfg = train_mod.TrainConfig(data=str(data), epochs=a.epochs, imgsz=320, batch=8, device="cpu",
                                        project=str(tmp / "runs"), name=f"{arm.split()[0]}{pair}", workers=0)
            t0 = time.perf_counter()
            train_mod.train(cfg, resume=False)
            secs = epoch_seconds(Path(cfg.project) / cfg.name / "results.csv")
            per_epoch[arm].append(sum(secs) / len(secs))
            print(f"pair {pair + 1}, {arm}: {torch.get_num_threads()} threads at the end, "
                  f"{per_epoch[arm][-1]:.1f} s an epoch ({time.perf_counter() - t0:.0f} s in all)")
    base, new = (sum(v) / len(v) for v in per_epoch.values())
    print(f"{cores} cores, {a.fields} fields, imgsz 320, batch 8: ultralytics default {base:.1f} s an epoch, "
          f"livecell-ray {new:.1f} s: {base / new:.2f}x faster")


if __name__ == "__main__":
    main()
