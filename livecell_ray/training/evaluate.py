"""LIVECell-protocol evaluation with pycocotools.

The protocol of Edlund et al. 2021: one class (useCats=0), maxDets 100/500/2000 with AP read at
2,000, area ranges small < 324 px^2, medium 324-961, large >= 961; mask and box AP. We add AP50,
AP75, F1 at IoU 0.5 and the relative count error, overall and per cell type.

Predictions come from the same code path as ``livecell-ray segment`` (read -> normalise ->
Segmenter -> non-overlapping label image), so these numbers describe what users get.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livecell_ray.config import DEFAULT_CONF, InferenceConfig
from livecell_ray.plate.imaging import normalize
from livecell_ray.plate.manifest import parse_name

AREA_RANGES = [[0, 1e10], [0, 324], [324, 961], [961, 1e10]]
AREA_LABELS = ["all", "small", "medium", "large"]
MAX_DETS = [100, 500, 2000]


@dataclass
class EvalImage:
    """Ground truth for one image: its file and instance label image."""

    name: str
    path: str
    gt: np.ndarray
    cell_type: str = ""


@dataclass
class Prediction:
    labels: np.ndarray
    scores: np.ndarray


@dataclass
class Metrics:
    n_images: int
    n_gt: int
    n_pred: int
    mask: dict[str, float] = field(default_factory=dict)
    box: dict[str, float] = field(default_factory=dict)
    f1_50: float = 0.0
    precision_50: float = 0.0
    recall_50: float = 0.0
    count_error: float = 0.0


def load_mask_folder(root: str | Path, image_name: str = "raw.tif",
                     label_name: str = "instances_ids.png") -> list[EvalImage]:
    """Usiigaci layout: sub-folders with an image and its instance label image."""

    from livecell_ray.training.dataset import read_label_image

    out = []
    for sub in sorted(p for p in Path(root).iterdir() if (p / image_name).exists()):
        out.append(EvalImage(sub.name, str(sub / image_name), read_label_image(sub / label_name)))
    if not out:
        raise FileNotFoundError(f"{root}: no sub-folders holding {image_name} and {label_name}")
    return out


def load_ctc(root: str | Path) -> list[EvalImage]:
    """The Cell Tracking Challenge layout's labelled frames (:func:`livecell_ray.training.dataset.ctc_frames`)."""
    from livecell_ray.training.dataset import ctc_frames, read_label_image

    return [EvalImage(name, str(frame), read_label_image(seg)) for name, frame, seg in ctc_frames(root)]


def load_labelled(source: str, images_dir: str | None = None) -> list[EvalImage]:
    """Ground truth in any layout training takes (:func:`livecell_ray.training.dataset.read_labelled`)."""
    from livecell_ray.training import dataset

    if source.endswith(".json"):
        if not images_dir:
            raise ValueError("a COCO annotation file needs IMAGES_DIR")
        return load_coco(source, images_dir)
    if dataset.is_ctc(source):
        return load_ctc(source)
    if any((p / dataset.CURATED_IMAGE).exists() for p in Path(source).iterdir() if p.is_dir()):
        return load_mask_folder(source, dataset.CURATED_IMAGE, dataset.CURATED_LABELS)
    return load_mask_folder(source)


def load_coco(annotations: str | Path, images_dir: str | Path) -> list[EvalImage]:
    """COCO json (LIVECell's) into label images; cell type from the file name when it parses."""
    from livecell_ray.training.dataset import read_coco

    coco = json.loads(Path(annotations).read_text())
    by_stem = {Path(im["file_name"]).stem: im for im in coco["images"]}
    out = []
    for f in read_coco(annotations, images_dir):
        im = by_stem[f.name]
        meta = parse_name(im["file_name"])
        out.append(EvalImage(f.name, str(Path(images_dir) / im["file_name"]), f.labels,
                             im.get("cell_type") or (meta or {}).get("cell_type", "")))
    return out


def predict(images: Iterable[EvalImage], segmenter, pixel_size: float | None = None) -> list[Prediction]:
    """Run the segmenter exactly as the pipeline does, one image at a time (``pixel_size``: the images'
    um/px, as segment --pixel-size; else what each file's metadata says, else the model's)."""
    from livecell_ray.plate.imaging import read_image_with_info

    preds = []
    for im in images:
        raw, info = read_image_with_info(im.path)
        img = normalize(raw)
        r = segmenter([img], [im.cell_type], [pixel_size or info.pixel_size])[0]
        preds.append(Prediction(r.labels, r.confidences))
    return preds


def _rles(labels: np.ndarray) -> tuple[list[dict], list[int]]:
    from pycocotools import mask as mask_utils

    ids = [int(v) for v in np.unique(labels) if v != 0]
    rles = []
    for v in ids:
        rle = mask_utils.encode(np.asfortranarray((labels == v).astype(np.uint8)))
        rles.append(rle)
    return rles, ids


def to_coco(images: list[EvalImage], preds: list[Prediction]) -> tuple[dict, list[dict]]:
    """Ground truth dataset dict and detection list in COCO form (RLE masks)."""
    from pycocotools import mask as mask_utils

    gt_images, gt_anns, dets = [], [], []
    ann_id = 1
    for img_id, (im, pr) in enumerate(zip(images, preds), start=1):
        h, w = im.gt.shape
        gt_images.append({"id": img_id, "width": w, "height": h, "file_name": im.name})
        rles, _ = _rles(im.gt)
        for rle in rles:
            area = float(mask_utils.area(rle))
            bbox = mask_utils.toBbox(rle).tolist()
            rle = {"size": rle["size"], "counts": rle["counts"].decode()}
            gt_anns.append({"id": ann_id, "image_id": img_id, "category_id": 1, "segmentation": rle,
                            "area": area, "bbox": bbox, "iscrowd": 0})
            ann_id += 1
        rles, ids = _rles(pr.labels)
        for rle, v in zip(rles, ids):
            bbox = mask_utils.toBbox(rle).tolist()
            dets.append({"image_id": img_id, "category_id": 1, "score": float(pr.scores[v - 1]),
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "bbox": bbox})
    gt = {"images": gt_images, "annotations": gt_anns, "categories": [{"id": 1, "name": "cell"}]}
    return gt, dets


def coco_ap(gt: dict, dets: list[dict], iou_type: str) -> dict[str, float]:
    """pycocotools COCOeval with LIVECell's parameters; AP at maxDets 2000."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = json.loads(json.dumps(gt))
        cg.createIndex()
        cd = cg.loadRes(dets) if dets else COCO()
        if not dets:
            return {k: 0.0 for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR")}
        ev = COCOeval(cg, cd, iou_type)
        ev.params.useCats = 0
        ev.params.maxDets = MAX_DETS
        ev.params.areaRng = AREA_RANGES
        ev.params.areaRngLbl = AREA_LABELS
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"AP": s[0], "AP50": s[1], "AP75": s[2], "AP_small": s[3], "AP_medium": s[4], "AP_large": s[5],
            "AR": s[8]}


def match_f1(images: list[EvalImage], preds: list[Prediction], iou: float = 0.5) -> tuple[float, float, float]:
    """F1, precision and recall of one-to-one matches at IoU >= iou (masks do not overlap)."""
    tp = n_gt = n_pred = 0
    for im, pr in zip(images, preds):
        g, p = im.gt.ravel().astype(np.int64), pr.labels.ravel().astype(np.int64)
        ng, npred = int(g.max()) if g.size else 0, int(p.max()) if p.size else 0
        gs = np.bincount(g, minlength=ng + 1)
        ps = np.bincount(p, minlength=npred + 1)
        both = (g > 0) & (p > 0)
        inter = np.bincount(g[both] * (npred + 1) + p[both], minlength=(ng + 1) * (npred + 1))
        inter = inter.reshape(ng + 1, npred + 1)
        gi, pi = np.nonzero(inter)
        ious = inter[gi, pi] / (gs[gi] + ps[pi] - inter[gi, pi])
        tp += int((ious >= iou).sum())  # IoU > 0.5 pairs are unique for non-overlapping masks
        n_gt += int((gs[1:] > 0).sum())
        n_pred += int((ps[1:] > 0).sum())
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gt if n_gt else 0.0
    f1 = 2 * tp / (n_gt + n_pred) if (n_gt + n_pred) else 0.0
    return f1, prec, rec


#: Confidence thresholds :func:`count_threshold` chooses among.
COUNT_CONF_GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(15))  # 0.10 ... 0.80


def count_threshold(segmenter, images: list[EvalImage], pixel_size: float | None = None
                    ) -> tuple[float, float, float]:
    """The confidence threshold at which ``segmenter``'s count of cells best matches ``images``' own (the mean
    count error, as :func:`evaluate`; ties to the lower threshold): (threshold, its error, the error at
    DEFAULT_CONF). ``segmenter`` must run at a threshold no higher than the grid's lowest.

    Why: a model fine-tuned on a few fields of a new line is not calibrated like the one it came from. On HeLa
    DIC at 63x, five frames' fine-tune counted 20-28% too many cells at 0.25, weak detections at the frame's
    edge and beside true cells, while its matched cells barely changed up to 0.5 (docs/curate.md). Chosen on
    the fields it trained on, the threshold errs low (they are its easiest), which costs little."""
    preds = predict(images, segmenter, pixel_size)
    n_gt = [n_cells(i.gt) for i in images]

    def error(c: float) -> float:
        return count_error([int((p.scores >= c).sum()) for p in preds], n_gt)

    errors = {c: error(c) for c in COUNT_CONF_GRID}
    best = min(errors, key=lambda c: (round(errors[c], 6), c))
    return best, errors[best], error(DEFAULT_CONF)


def n_cells(gt: np.ndarray) -> int:
    """Cells in a ground-truth label image (its labels may have gaps)."""
    return len(np.unique(gt)) - (1 if (gt == 0).any() else 0)


def count_error(found: list[int], truth: list[int]) -> float:
    """The mean of |found - true| / true over images (LIVECell's count error; 0 for no images)."""
    return float(np.mean([abs(a - b) / max(b, 1) for a, b in zip(found, truth)])) if truth else 0.0


def evaluate(images: list[EvalImage], preds: list[Prediction]) -> Metrics:
    """All metrics for one set of images."""
    gt, dets = to_coco(images, preds)
    f1, prec, rec = match_f1(images, preds)
    n_gt = [n_cells(i.gt) for i in images]
    n_pr = [int(p.labels.max()) for p in preds]
    count_err = count_error(n_pr, n_gt)
    return Metrics(len(images), sum(n_gt), sum(n_pr), coco_ap(gt, dets, "segm"), coco_ap(gt, dets, "bbox"),
                   f1, prec, rec, count_err)


def evaluate_by_type(images: list[EvalImage], preds: list[Prediction]) -> dict[str, Metrics]:
    """'all' plus one entry per cell type present."""
    out = {"all": evaluate(images, preds)}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        if im.cell_type:
            groups[im.cell_type].append(i)
    if len(groups) > 1 or (groups and len(next(iter(groups.values()))) != len(images)):
        for ct, idx in sorted(groups.items()):
            out[ct] = evaluate([images[i] for i in idx], [preds[i] for i in idx])
    return out


def table(results: dict[str, Metrics]) -> str:
    """The seed study's per-cell-type table: mask and box AP50-95, AP50, AP75, F1, count error."""
    head = f"{'cell type':<10} {'images':>6} {'cells':>6} {'mask AP':>8} {'AP50':>6} {'AP75':>6} " \
           f"{'AP_s':>6} {'AP_m':>6} {'AP_l':>6} {'box AP':>7} {'F1@.5':>6} {'count err':>9}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        lines.append(f"{name:<10} {m.n_images:>6} {m.n_gt:>6} {m.mask['AP']:>8.3f} {m.mask['AP50']:>6.3f} "
                     f"{m.mask['AP75']:>6.3f} {m.mask['AP_small']:>6.3f} {m.mask['AP_medium']:>6.3f} "
                     f"{m.mask['AP_large']:>6.3f} {m.box['AP']:>7.3f} {m.f1_50:>6.3f} {m.count_error:>9.3f}")
    return "\n".join(lines)


def to_json(results: dict[str, Metrics], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    return {**(extra or {}), "results": {k: asdict(v) for k, v in results.items()}}


def run(weights_spec: str, source: str, images_dir: str | None = None, inference: InferenceConfig | None = None,
        trust: bool = False, select: list[str] | None = None, pixel_size: float | None = None
        ) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """Evaluate shipped or user weights on a COCO json (+ images dir) or a mask folder."""
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter

    images = load_labelled(source, images_dir)
    if select:
        images = [i for i in images if i.name in set(select)]
    weights = models.resolve_map(weights_spec, trust)
    inference = inference or InferenceConfig()
    seg = Segmenter(weights, inference)
    preds = predict(images, seg, pixel_size)
    info = {"weights": {k: {"path": w.path, "sha256": w.sha256} for k, w in weights.items()},
            "source": source, "images": [i.name for i in images], "inference": inference.__dict__,
            "imgsz": seg.imgsz,  # each model's input as it ran (the model's own where the run set none)
            "pixel_size": pixel_size}
    return evaluate_by_type(images, preds), info
