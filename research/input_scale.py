"""At what input scale does a LIVECell-trained YOLOv8n-seg segment best? Cross-validated, with nested selection.
Figure: weights/README.md ("The input scale"); small.pt's default imgsz 832 in weights/models.json.

Each fold model of research/gpu_livecell.sh (`runs/lc_student/f{1..5}-real`: stage 1 trained on for as long
again, every one without its held-out annotated field) segments the field it never saw with the field
letterboxed to each input size of the grid (704 keeps LIVECell's 704x520 at its own scale; 832 enlarges it
1.18x), through the `segment` code path, fp32, and is scored with LIVECell's protocol. Then, honestly:
for each fold the size is chosen on the other four folds' mean only, among the sizes within the issue's
cost limit (1.5x the CPU of 704), and that choice is scored on the held-out field: the nested estimate.

    python research/input_scale.py [--sizes 704,800,832,864,928,1056] [--affordable 704,800,832]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PACK = Path(".gpu/lc")  # research/pack_livecell_gpu.py: the annotated fields, one folder each
FOLDS = {"f1": "BT474_Phase_B3_2_02d12h00m_3", "f2": "BT474_Phase_C3_1_01d04h00m_4",
         "f3": "Huh7_Phase_A10_1_02d12h00m_3", "f4": "MCF7_Phase_F4_2_00d00h00m_4",
         "f5": "MCF7_Phase_G4_2_02d16h00m_1"}


def score(weights: str, field: str, imgsz: int) -> dict:
    """mask AP, AP75, cells found and true of one fold model on its held-out field at one input size."""
    from livecell_ray.config import InferenceConfig
    from livecell_ray.training import evaluate

    res, _ = evaluate.run(weights, str(PACK), inference=InferenceConfig(imgsz=imgsz, half=False), trust=True,
                          select=[field])
    m = res["all"]
    return {"AP": m.mask["AP"], "AP75": m.mask["AP75"], "found": m.n_pred, "cells": m.n_gt}


def nested(ap: dict[str, dict[int, float]], affordable: list[int]) -> tuple[float, dict[str, int]]:
    """Each fold scored at the size the other folds' mean chose: the estimate no field selected itself."""
    chosen = {f: max(affordable, key=lambda s, f=f: np.mean([ap[g][s] for g in ap if g != f])) for f in ap}
    return float(np.mean([ap[f][chosen[f]] for f in ap])), chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="704,800,832,864,928,1056")
    p.add_argument("--affordable", default="704,800,832", help="sizes within 1.5x the CPU of 704 "
                   "(research/model_cost.py weights/small.pt weights/small.pt --imgsz-a 704 --imgsz-b SIZE)")
    p.add_argument("--runs", default="runs/lc_student")
    p.add_argument("--json", default=None, help="write every score here")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = {f: {s: score(f"{a.runs}/{f}-real/weights/last.pt", name, s) for s in sizes} for f, name in FOLDS.items()}
    print("| held-out field (cells) | " + " | ".join(f"imgsz {s}" for s in sizes) + " |")
    print("|" + " --- |" * (len(sizes) + 1))
    for f, by in rows.items():
        cells = next(iter(by.values()))["cells"]
        print(f"| {FOLDS[f]} ({cells}) | " + " | ".join(
            f"{r['AP']:.3f} / {r['AP75']:.3f} / {r['found']}" for r in by.values()) + " |")
    means = [np.array([rows[f][s]["AP"] for f in rows]) for s in sizes]
    print("| mean (sd) | " + " | ".join(f"**{m.mean():.3f}** ({m.std(ddof=1):.3f})" for m in means) + " |")
    ap = {f: {s: r["AP"] for s, r in by.items()} for f, by in rows.items()}
    est, chosen = nested(ap, [int(s) for s in a.affordable.split(",")])
    print(f"nested estimate {est:.3f} (sizes chosen per fold on the other four: {chosen}); "
          f"imgsz 704: {np.mean([ap[f][704] for f in ap]):.3f}" if 704 in sizes else f"nested estimate {est:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({f: {str(s): r for s, r in by.items()} for f, by in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
