"""Where a model's held-out mask AP goes: boundaries, the foreground as a whole, or the split of touching cells.
Figure: big.pt on sets 41-45, median best IoU 0.72, foreground IoU 0.67-0.74, clipped-to-truth AP 0.65
(research/README.md).

    python research/error_analysis.py big ../shared/data/usiigaci/train set41,set42,set43,set44,set45

Predictions come from the same path as `livecell-ray evaluate` (and so `segment`). Printed: mask AP,
AP50, AP75; the quantiles of each true cell's best IoU with a predicted cell; per field the IoU of
the predicted foreground (all cells together) with the true one and their area ratio; and two
oracles that say what fixing the foreground alone would be worth: the predictions clipped to the
true foreground, and clipped after growing each predicted cell into it (so that only the split
between cells and their count are the model's); how many predicted cells lie outside the true
foreground (overlap under 10%) and the AP without them; the AP with every cell eroded by 1 and 2 px.
"""

from __future__ import annotations

import sys

import numpy as np

from livecell_ray.config import InferenceConfig
from livecell_ray.model import models
from livecell_ray.model.segment import Segmenter
from livecell_ray.training import evaluate as ev


def best_ious(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Each true cell's best IoU with any predicted cell."""
    g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    ng, npred = int(g.max()), int(p.max())
    gs, ps = np.bincount(g, minlength=ng + 1), np.bincount(p, minlength=npred + 1)
    both = (g > 0) & (p > 0)
    inter = np.bincount(g[both] * (npred + 1) + p[both], minlength=(ng + 1) * (npred + 1)).reshape(ng + 1, -1)
    iou = inter / np.maximum(gs[:, None] + ps[None, :] - inter, 1)
    return iou[1:, 1:].max(1)[gs[1:] > 0] if npred else np.zeros(int((gs[1:] > 0).sum()))


def main() -> None:
    from skimage.segmentation import expand_labels

    model, data, sets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    images = [i for i in ev.load_mask_folder(data) if i.name in set(sets)]
    preds = ev.predict(images, Segmenter(models.resolve_map(model, True), InferenceConfig()))
    m = ev.evaluate(images, preds)
    print(f"{model} on {', '.join(sets)}: mask AP {m.mask['AP']:.3f}, AP50 {m.mask['AP50']:.3f}, "
          f"AP75 {m.mask['AP75']:.3f}")
    ious = np.concatenate([best_ious(i.gt, p.labels) for i, p in zip(images, preds)])
    q = np.quantile(ious, [0.1, 0.25, 0.5, 0.75, 0.9])
    print(f"true cells' best IoU: quantiles 10/25/50/75/90% {' '.join(f'{v:.3f}' for v in q)}; "
          f">= 0.5 {np.mean(ious >= 0.5):.0%}, >= 0.75 {np.mean(ious >= 0.75):.0%}")
    for im, p in zip(images, preds):
        g, f = im.gt > 0, p.labels > 0
        print(f"  {im.name}: foreground IoU {(g & f).sum() / (g | f).sum():.3f}, predicted / true foreground "
              f"{f.sum() / g.sum():.3f}, cells true {len(np.unique(im.gt)) - 1} predicted {int(p.labels.max())}")
    for name, fix in (("clipped to the true foreground", lambda lab: lab),
                      ("grown into and clipped to the true foreground", lambda lab: expand_labels(lab, 20))):
        oracle = []
        for im, p in zip(images, preds):
            lab = fix(p.labels.astype(np.int32))
            lab[im.gt == 0] = 0
            oracle.append(ev.Prediction(lab, p.scores))
        o = ev.evaluate(images, oracle)
        print(f"oracle, predictions {name}: mask AP {o.mask['AP']:.3f}, AP75 {o.mask['AP75']:.3f}")
    outside, total, kept = 0, 0, []
    for im, p in zip(images, preds):
        lab = p.labels.astype(np.int64)
        n = int(lab.max())
        inside = np.bincount(lab.ravel(), weights=(im.gt.ravel() > 0), minlength=n + 1)
        frac = inside / np.maximum(np.bincount(lab.ravel(), minlength=n + 1), 1)
        frac[0] = 1.0
        outside, total = outside + int((frac[1:] < 0.1).sum()), total + n
        kept.append(ev.Prediction(np.where(frac[lab] >= 0.1, lab, 0), p.scores))
    print(f"predicted cells outside the true foreground (< 10% overlap): {outside} of {total}; "
          f"oracle without them: mask AP {ev.evaluate(images, kept).mask['AP']:.3f}")
    for px in (1, 2):
        eroded = []
        for p in preds:
            lab = p.labels.astype(np.int64)
            for _ in range(px):  # a pixel stays where its 4 neighbours carry its label
                q = np.pad(lab, 1, mode="edge")
                c = q[1:-1, 1:-1]
                lab = np.where((q[:-2, 1:-1] == c) & (q[2:, 1:-1] == c) & (q[1:-1, :-2] == c) & (q[1:-1, 2:] == c),
                               lab, 0)
            eroded.append(ev.Prediction(lab, p.scores))
        print(f"every cell eroded by {px} px: mask AP {ev.evaluate(images, eroded).mask['AP']:.3f}")


if __name__ == "__main__":
    main()
