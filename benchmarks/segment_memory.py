"""Memory of segmenting one stitched field: network batches of 4 tiles (a CPU's default) against 64.

    python benchmarks/segment_memory.py [--size 5000] [--batches 4,64]

Builds a SIZE x SIZE field from the bundled LIVECell examples (real cells, LIVECell's scale) and segments
it with `small.pt` through `Segmenter` (what a model replica runs), at LIVECell's pixel size, once per
``max_batch`` value, each in a fresh process: the peak RSS the call adds over the process before it
(polled every 20 ms), its time, and the cells found (the same for every batch size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stitched(size: int):
    """A size x size field tiled from the bundled examples, normalised as the pipeline does."""
    import numpy as np

    from livecell_ray.plate.imaging import normalize, read_image

    ims = [normalize(read_image(str(p))) for p in sorted((ROOT / "examples" / "livecell_plate").rglob("*.tif"))]
    big = np.zeros((size, size), np.uint8)
    k = 0
    for y in range(0, size, 520):
        for x in range(0, size, 704):
            im = ims[k % len(ims)]
            k += 1
            big[y:y + 520, x:x + 704] = im[:min(520, size - y), :min(704, size - x)]
    return big, ims[0]


def one(size: int, batch: int) -> dict:
    """Segment the field once in this process; the peak RSS it added, seconds, cells."""
    import psutil

    from livecell_ray import offline
    from livecell_ray.config import InferenceConfig
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter

    offline.configure()
    big, small = stitched(size)
    seg = Segmenter({models.DEFAULT_KEY: models.resolve("small")}, InferenceConfig(max_batch=batch))
    seg([small])  # warm-up: the network's first call allocates its own buffers
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    t = time.perf_counter()
    cells = int(seg([big], None, [1.24])[0].labels.max())
    seconds = time.perf_counter() - t
    done.set()
    return {"batch": batch, "peak_gib": (peak[0] - base) / 2**30, "seconds": seconds, "cells": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=5000)
    ap.add_argument("--batches", default="4,64")
    ap.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._one is not None:
        print(json.dumps(one(a.size, a._one)))
        return
    print(f"one {a.size}x{a.size} stitched field, small.pt on the CPU, each batch size in a fresh process:")
    for b in (int(x) for x in a.batches.split(",")):
        done = subprocess.run([sys.executable, __file__, "--size", str(a.size), "--_one", str(b)],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  max_batch {r['batch']:3d}: segmenting adds {r['peak_gib']:.2f} GiB of peak RSS, "
              f"{r['seconds']:.1f} s, {r['cells']} cells", flush=True)


if __name__ == "__main__":
    main()
