"""Is Sartorius's SH-SY5Y at LIVECell's scale? (issue 31). LIVECell's own SH-SY5Y fields here carry no
annotations, so one model (the Sartorius-pre-trained f0 candidate) segments both LIVECell's unlabelled SH-SY5Y
fields and Sartorius's held-out SH-SY5Y fields, and the two size distributions of what it finds are compared
beside the annotated Sartorius cells. A model's size bias is the same on both sides, so a ratio of medians far
from 1 says the two sources image SH-SY5Y at different scales (or annotate them differently).

    python research/shsy5y_scale.py [--weights weights/logs/sartorius/f0/last.pt]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LOGS = ROOT / "weights" / "logs" / "sartorius"


def areas(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels.ravel())
    return counts[1:][counts[1:] > 0]


def main() -> None:
    from pycocotools import mask as mask_utils

    from livecell_ray.config import InferenceConfig
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter
    from livecell_ray.plate.imaging import read_image_with_info
    from livecell_ray.plate.normalize import normalize

    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=str(LOGS / "f0" / "last.pt"))
    a = ap.parse_args()
    seg = Segmenter(models.resolve_map(a.weights, True), InferenceConfig(imgsz=704, half=False))

    def found(paths: list[Path]) -> tuple[np.ndarray, list[int]]:
        out, counts = [], []
        for p in paths:
            raw, info = read_image_with_info(str(p))
            lab = seg([normalize(raw)], ["shsy5y"], [None])[0].labels
            out.append(areas(lab))
            counts.append(len(out[-1]))
        return np.concatenate(out), counts

    lc = sorted((DATA / "livecell" / "unlabelled").rglob("SHSY5Y*.tif"))
    coco = json.loads((DATA / "sartorius" / "annotations.json").read_text())
    sh = sorted(i["file_name"] for i in coco["images"] if i["file_name"].startswith("shsy5y_"))[::5]
    ids = {i["id"] for i in coco["images"] if i["file_name"] in set(sh)}
    gt = np.array([mask_utils.area(a["segmentation"]) if isinstance(a["segmentation"], dict) else a["area"]
                   for a in coco["annotations"] if a["image_id"] in ids], float)
    lc_found, lc_n = found(lc)
    sh_found, sh_n = found([DATA / "sartorius" / "images" / n for n in sh])
    res = {"weights": a.weights, "livecell_fields": len(lc), "sartorius_fields": len(sh),
           "livecell_found_median_px": float(np.median(lc_found)), "livecell_cells_per_field": float(np.mean(lc_n)),
           "sartorius_found_median_px": float(np.median(sh_found)), "sartorius_cells_per_field": float(np.mean(sh_n)),
           "sartorius_annotated_median_px": float(np.median(gt))}
    res["area_ratio_livecell_over_sartorius"] = res["livecell_found_median_px"] / res["sartorius_found_median_px"]
    res["linear_scale"] = float(np.sqrt(res["area_ratio_livecell_over_sartorius"]))
    print(json.dumps(res, indent=1))
    (LOGS / "shsy5y_scale.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
