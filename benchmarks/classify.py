"""What the field classifier costs a field, side by side with segmentation alone (ratios, same process).

Without ``--route auto`` the classifier reads the cells the run already found (``FieldClassifier.from_cells``),
so its cost is measuring them; with it, every field is first segmented by the general model in the routing
pass, then by its routed model.

    python benchmarks/classify.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from livecell_ray.config import InferenceConfig
    from livecell_ray.model import models
    from livecell_ray.model.classify import FieldClassifier
    from livecell_ray.model.segment import Segmenter
    from livecell_ray.plate.imaging import normalize, read_image

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    paths = sorted((ROOT / "examples" / "livecell_plate").glob("*.tif"))
    images = [normalize(read_image(str(p))) for p in paths]
    seg = Segmenter(models.resolve_map("small"), InferenceConfig())
    clf = FieldClassifier(models.resolve_classifier(models.CLASSIFIER), segmenter=seg)
    px = [1.24] * len(images)
    seg(images[:1], None, px[:1])  # warm-up
    t_seg = t_cls = 0.0
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        found = [seg([im], None, [p])[0] for im, p in zip(images, px)]
        t1 = time.perf_counter()
        clf.from_cells(images, found, px)
        t2 = time.perf_counter()
        t_seg += t1 - t0
        t_cls += t2 - t1
    n = a.repeats * len(images)
    print(json.dumps({"fields": n, "segment_s_per_field": round(t_seg / n, 3),
                      "classify_from_cells_s_per_field": round(t_cls / n, 4),
                      "route_none_cost_ratio": round((t_seg + t_cls) / t_seg, 3),
                      "route_auto_cost_ratio_at_most": round((2 * t_seg + t_cls) / t_seg, 3)}))


if __name__ == "__main__":
    main()
