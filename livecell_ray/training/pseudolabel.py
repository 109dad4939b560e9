"""Pseudo-labels for self-training (noisy-student style) from unlabelled fields.

A trained model segments each unlabelled field with test-time augmentation; only the cells it is
sure of, with plausible shapes, are kept, and the field is written in the Usiigaci layout
(``<field>/raw.tif`` + ``<field>/instances_ids.png``) that ``livecell-ray train --pseudo`` reads.
Box-shaped masks (extent near 1) and ragged ones (low solidity) are the failure modes of an
under-trained YOLO-seg on dense fields, so they are dropped rather than taught back to the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livecell_ray.config import InferenceConfig
from livecell_ray.plate.imaging import normalize, read_image
from livecell_ray.plate.manifest import parse_name

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class PseudoConfig:
    """What makes a predicted cell trustworthy enough to train on."""

    conf: float = 0.4  # detection confidence kept
    min_area: int = 20  # px; smaller fragments are noise at LIVECell's scale
    max_extent: float = 0.92  # area / box area; above it the mask is a box, not an outline
    min_solidity: float = 0.75  # area / convex area; below it the mask is ragged
    imgsz: int | None = None  # the model's own
    tta: bool = True


def keep_plausible(labels: np.ndarray, scores: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    """The label image with only confident, plausibly shaped cells, renumbered 1..K."""
    from skimage.measure import regionprops

    keep = np.zeros(int(labels.max()) + 1, np.int32)
    k = 0
    for r in regionprops(labels):
        if scores[r.label - 1] < cfg.conf or r.area < cfg.min_area:
            continue
        if r.extent > cfg.max_extent or r.solidity < cfg.min_solidity:
            continue
        k += 1
        keep[r.label] = k
    return keep[labels]


def pseudo_label(weights: str, images_dir: str | Path, out: str | Path, cfg: PseudoConfig | None = None,
                 trust_weights: bool = False) -> list[dict]:
    """Segment every image in a folder and write kept cells as training fields; one summary row per field."""
    from PIL import Image

    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter

    cfg = cfg or PseudoConfig()
    paths = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{images_dir}: no images to pseudo-label")
    seg = Segmenter({models.DEFAULT_KEY: models.resolve(weights, trust_weights)},
                    InferenceConfig(imgsz=cfg.imgsz, conf=min(cfg.conf, 0.25), tta=cfg.tta))
    rows = []
    for p in paths:
        img = normalize(read_image(str(p)))
        meta = parse_name(p.name) or {}
        r = seg([img], [meta.get("cell_type", "")])[0]
        kept = keep_plausible(r.labels, r.confidences, cfg)
        field = Path(out) / p.stem
        field.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(field / "raw.tif")
        Image.fromarray(kept.astype(np.uint16)).save(field / "instances_ids.png")
        rows.append({"field": p.stem, "cell_type": meta.get("cell_type", ""), "predicted": int(r.labels.max()),
                     "kept": int(kept.max())})
    return rows
