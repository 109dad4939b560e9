"""How much mask AP the prototype resolution alone would cost: the ground truth through a YOLOv8 mask grid.
Figure: mask AP allowed by the prototype grid, 0.837 at imgsz 512, 0.967 at 1024 (research/README.md).

Each true cell mask is area-averaged down to the prototype grid (a quarter of the letterboxed input),
upsampled back bilinearly and thresholded at 0.5, as the model's masks are. With perfect detections,
the fraction of cells at IoU >= t, averaged over t = 0.50..0.95, is the mask AP that resolution allows.

    python research/proto_ceiling.py ../shared/data/usiigaci/train set41,set42,set43,set44,set45
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from livecell_ray.training import dataset

THRESHOLDS = np.arange(0.5, 0.96, 0.05)


def round_trip_ious(labels: np.ndarray, imgsz: int) -> list[float]:
    """IoU of each instance with itself after the trip through the prototype grid at this imgsz."""
    h, w = labels.shape
    r = imgsz / max(h, w)
    ph, pw = max(1, round(h * r / 4)), max(1, round(w * r / 4))
    out = []
    for i in np.unique(labels)[1:]:
        m = (labels == i).astype(np.float32)
        small = cv2.resize(m, (pw, ph), interpolation=cv2.INTER_AREA)
        back = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
        g = m > 0
        out.append(float((back & g).sum() / max((back | g).sum(), 1)))
    return out


def main() -> None:
    fields = [f for f in dataset.read_mask_folder(sys.argv[1]) if f.name in set(sys.argv[2].split(","))]
    for imgsz in (512, 704, 1024):
        ious = np.array([v for f in fields for v in round_trip_ious(f.labels, imgsz)])
        ap = np.mean([(ious >= t).mean() for t in THRESHOLDS])
        print(f"imgsz {imgsz:5d}: {len(ious)} cells, median IoU {np.median(ious):.3f}, "
              f"mask AP ceiling {ap:.3f}, AP75 ceiling {(ious >= 0.75).mean():.3f}")


if __name__ == "__main__":
    main()
