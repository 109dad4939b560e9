"""CPU cost of a field for two weights files, side by side: is a new default within 1.5x of the old one?
Figure: weights/README.md (the new small.pt against the one it replaced).

Each model segments the 10 bundled example fields through `Segmenter` (the code `segment` runs), one
thread, alternating A, B, A, B so that the machine's noise falls on both; prints CPU ms a field of each
(median of the rounds) and the ratio B / A.

    python research/model_cost.py OLD.pt NEW.pt [--rounds 3]
    python research/model_cost.py weights/small.pt weights/small.pt --imgsz-a 704   # the input size's cost
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "livecell_plate"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--imgsz-a", type=int, default=None, help="network input of A (default: the model's own)")
    ap.add_argument("--imgsz-b", type=int, default=None, help="network input of B (default: the model's own)")
    args = ap.parse_args()
    import torch

    from livecell_ray.config import InferenceConfig
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter
    from livecell_ray.plate.imaging import normalize, read_image

    torch.set_num_threads(1)
    images = [normalize(read_image(str(p))) for p in sorted(EXAMPLES.rglob("*.tif"))]
    segs = {k: Segmenter({models.DEFAULT_KEY: models.resolve(w, trust=True)}, InferenceConfig(imgsz=size))
            for k, w, size in (("A", args.a, args.imgsz_a), ("B", args.b, args.imgsz_b))}
    for s in segs.values():
        s(images[:1])  # warm-up
    ms: dict[str, list[float]] = {"A": [], "B": []}
    cells: dict[str, int] = {}
    for _ in range(args.rounds):
        for k, s in segs.items():
            t = time.process_time()
            res = [s([im])[0] for im in images]
            ms[k].append(1000 * (time.process_time() - t) / len(images))
            cells[k] = sum(int(r.labels.max()) for r in res)
    a, b = float(np.median(ms["A"])), float(np.median(ms["B"]))
    size = {k: s.imgsz[models.DEFAULT_KEY] for k, s in segs.items()}
    print(f"A {args.a} (imgsz {size['A']}): {a:.0f} ms a field ({cells['A']} cells on {len(images)} fields)")
    print(f"B {args.b} (imgsz {size['B']}): {b:.0f} ms a field ({cells['B']} cells)")
    print(f"B / A: {b / a:.2f}")


if __name__ == "__main__":
    main()
