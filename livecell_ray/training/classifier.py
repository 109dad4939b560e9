"""Training and measuring the field cell-type classifier (the seed study's classify-then-segment).

File names often carry no cell type, yet per-type models need one. A YOLOv8-cls network (built from
ultralytics' ``yolov8n-cls.yaml``, trained here offline) learns the type from crops of fields whose
type is in their names; a field's type is the mean of its crops' class probabilities, so one odd
region does not decide it. Fields are split by name (never crops of one field on both sides), so the
held-out accuracy is a field-level, never-seen-field figure.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from livecell_ray import offline
from livecell_ray.model.classify import FieldClassifier, grid_crops
from livecell_ray.plate.imaging import normalize, read_image
from livecell_ray.plate.manifest import parse_name

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class ClassifierConfig:
    """Crops and training of the field classifier."""

    crop: int = 256  # px at the field's own scale (LIVECell: a few dozen cells)
    crops_per_field: int = 12  # random crops a training field gives each epoch's data set
    imgsz: int = 128  # network input; texture and shape survive the downscale
    epochs: int = 30
    batch: int = 32
    seed: int = 0
    time_hours: float | None = None


def field_type(path: Path) -> str | None:
    """The cell type from a LIVECell-style file name, or None."""
    meta = parse_name(path.name)
    return (meta or {}).get("cell_type") or None


def build_dataset(folders: list[str], out: str, val_fields: set[str], cfg: ClassifierConfig) -> dict[str, Any]:
    """ultralytics' classify layout (train/<type>/*.png, val/<type>/*.png) from fields named by type."""
    from PIL import Image

    rng = random.Random(cfg.seed)
    counts: dict[str, dict[str, int]] = {"train": defaultdict(int), "val": defaultdict(int)}
    root = Path(out)
    for folder in folders:
        for p in sorted(q for q in Path(folder).iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
            ctype = field_type(p)
            if ctype is None:
                continue
            split = "val" if p.stem in val_fields else "train"
            img = normalize(read_image(str(p)))
            h, w = img.shape
            size = min(cfg.crop, h, w)
            crops = grid_crops(img, size)
            if split == "train":  # random positions too, so the network sees every offset
                crops += [img[y:y + size, x:x + size] for y, x in
                          ((rng.randrange(h - size + 1), rng.randrange(w - size + 1))
                           for _ in range(cfg.crops_per_field))]
            d = root / split / ctype
            d.mkdir(parents=True, exist_ok=True)
            for k, c in enumerate(crops):
                Image.fromarray(c).save(d / f"{p.stem}_{k:02d}.png")
            counts[split][ctype] += 1
    summary = {"fields": {s: dict(c) for s, c in counts.items()}, "config": asdict(cfg)}
    (root / "prepared.json").write_text(json.dumps(summary, indent=2))
    return summary


def train(data: str, project: str, name: str, cfg: ClassifierConfig, resume: bool = True) -> Path:
    """Train yolov8n-cls from its YAML on a prepared crop set, offline and resumable; returns best.pt."""
    offline.configure()
    import torchvision  # noqa: F401
    from ultralytics import YOLO

    from livecell_ray.training.train import _offline_trainer, _use_every_core

    run = Path(project) / name
    last = run / "weights" / "last.pt"
    if resume and last.exists():
        model, args = YOLO(str(last)), {"resume": True, "plots": False}
    else:
        model = YOLO("yolov8n-cls.yaml")
        args = {"data": str(Path(data).resolve()), "epochs": cfg.epochs, "imgsz": cfg.imgsz, "batch": cfg.batch,
                "device": "cpu", "project": str(Path(project).resolve()), "name": name, "exist_ok": True,
                "workers": 0, "seed": cfg.seed, "plots": False, "pretrained": False, "amp": False,
                # grey phase contrast: no hue or saturation; any orientation
                "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.3, "fliplr": 0.5, "flipud": 0.5, "degrees": 180.0,
                "patience": cfg.epochs}
        if cfg.time_hours:
            args["time"] = cfg.time_hours
    model.add_callback("on_pretrain_routine_start", _use_every_core)
    with _offline_trainer():
        model.train(**args)
    return run / "weights" / "best.pt"


def accuracy_by_type(weights: str, folder: str, fields: set[str], crop: int = 256) -> dict[str, Any]:
    """Field-level accuracy per true type on the given fields (never trained on), with the confusions."""
    clf = FieldClassifier(weights, crop)
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wrong = []
    for p in sorted(q for q in Path(folder).iterdir() if q.stem in fields):
        true = field_type(p)
        pred, prob, _ = clf([normalize(read_image(str(p)))])[0]
        per[true][1] += 1
        per[true][0] += pred == true
        if pred != true:
            wrong.append({"field": p.stem, "true": true, "predicted": pred, "probability": round(prob, 3)})
    total = sum(c for c, _ in per.values()), sum(n for _, n in per.values())
    return {"accuracy": total[0] / max(1, total[1]), "fields": total[1],
            "per_type": {t: {"correct": c, "fields": n, "accuracy": c / n} for t, (c, n) in sorted(per.items())},
            "confusions": wrong}
