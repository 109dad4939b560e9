"""Convert labelled microscopy into ultralytics' YOLO-seg layout.

Two sources: COCO json with polygon or RLE segmentations (LIVECell's own files) and folders of
image + instance-label image (Usiigaci's ``setN/raw.tif`` + ``setN/instances_ids.png``). Pixels go
through :func:`livecell_ray.plate.imaging.normalize`, the same function inference uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from livecell_ray.plate.imaging import normalize, read_image


@dataclass(frozen=True)
class LabelledField:
    """One training field: normalised uint8 image and its instance label image (0 = background)."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def label_polygons(labels: np.ndarray, min_area: int = 4) -> list[np.ndarray]:
    """Outer contour of each instance as an (N, 2) float array of x, y pixel coordinates."""
    polys = []
    for lab in np.unique(labels):
        if lab == 0:
            continue
        m = (labels == lab).astype(np.uint8)
        if int(m.sum()) < min_area:
            continue
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float32)
        if len(c) >= 3:
            polys.append(c)
    return polys


def resize_field(f: LabelledField, scale: float) -> LabelledField:
    """Rescale image (area interpolation) and labels (nearest) by one factor."""
    if scale == 1.0:
        return f
    h, w = f.image.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = cv2.resize(f.image, size, interpolation=cv2.INTER_AREA)
    lab = cv2.resize(f.labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
    return LabelledField(f.name, img, lab.astype(np.int32))


def pad_field(f: LabelledField, size: int) -> LabelledField:
    """A field whose long side is under ``size`` padded (bottom and right, with its median grey, no cells) so
    that it is ``size`` long: seen at its own scale by a trainer that resizes every image to ``size``."""
    h, w = f.image.shape
    if max(h, w) >= size:
        return f
    ph, pw = (size - h, 0) if h >= w else (0, size - w)
    image = np.pad(f.image, ((0, ph), (0, pw)), constant_values=int(np.median(f.image)))
    return LabelledField(f.name, image, np.pad(f.labels, ((0, ph), (0, pw))))


def tile_field(f: LabelledField, tile: int, overlap: int = 0) -> Iterator[LabelledField]:
    """Cut a large field into tiles (cells cut by the border stay as partial cells)."""
    h, w = f.image.shape
    step = max(1, tile - overlap)
    for y in range(0, max(1, h - overlap), step):
        for x in range(0, max(1, w - overlap), step):
            y0, x0 = min(y, max(0, h - tile)), min(x, max(0, w - tile))
            yield LabelledField(f"{f.name}_y{y0}x{x0}", f.image[y0:y0 + tile, x0:x0 + tile],
                                f.labels[y0:y0 + tile, x0:x0 + tile])


def read_mask_folder(root: str | Path, image_name: str = "raw.tif",
                     label_name: str = "instances_ids.png") -> list[LabelledField]:
    """Usiigaci layout: one sub-folder per field holding the image and its instance label image."""
    root = Path(root)
    fields = []
    for sub in sorted(p for p in root.iterdir() if (p / image_name).exists()):
        img = normalize(read_image(str(sub / image_name)))
        if not (sub / label_name).exists():
            raise FileNotFoundError(f"{sub / label_name}: the field has an image but no labels")
        lab = read_label_image(sub / label_name)
        if lab.ndim == 3:
            lab = lab[..., 0]
        if lab.shape != img.shape:
            raise ValueError(f"{sub}: labels {lab.shape} do not match image {img.shape}")
        fields.append(LabelledField(sub.name, img, lab))
    if not fields:
        raise FileNotFoundError(f"{root}: no sub-folders with {image_name} and {label_name}")
    return fields


#: What ``livecell-ray curate`` writes in each field's folder, and napari's labels layer saves back.
CURATED_IMAGE, CURATED_LABELS = "image.tif", "labels.tif"


def ctc_frames(root: str | Path) -> list[tuple[str, Path, Path]]:
    """The Cell Tracking Challenge layout's labelled frames as (name ``NN_tNNN``, frame, labels): ``NN/tNNN.tif``
    with ``NN_GT/SEG/man_segNNN.tif`` (gold truth) or ``NN_ST/SEG/man_segNNN.tif`` (silver truth; gold wins
    where a frame has both). Frames without labels are left out."""
    root = Path(root)
    out = []
    for seq in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for frame in sorted(seq.glob("t*.tif")):
            n = frame.stem[1:]
            truth = [root / f"{seq.name}_{kind}" / "SEG" / f"man_seg{n}.tif" for kind in ("GT", "ST")]
            seg = next((t for t in truth if t.exists()), None)
            if seg is not None:
                out.append((f"{seq.name}_t{n}", frame, seg))
    if not out:
        raise FileNotFoundError(f"{root}: no NN/tNNN.tif frame with labels in NN_GT/SEG or NN_ST/SEG")
    return out


def read_ctc(root: str | Path) -> list[LabelledField]:
    """The Cell Tracking Challenge layout (:func:`ctc_frames`) as training fields."""
    fields = []
    for name, frame, seg in ctc_frames(root):
        img = normalize(read_image(str(frame)))
        lab = read_label_image(seg)
        if lab.shape != img.shape:
            raise ValueError(f"{seg}: labels {lab.shape} do not match {frame} {img.shape}")
        fields.append(LabelledField(name, img, lab))
    return fields


def is_ctc(root: str | Path) -> bool:
    root = Path(root)
    return root.is_dir() and any(p.is_dir() and p.name.isdigit() and
                                 any((root / f"{p.name}_{k}" / "SEG").is_dir() for k in ("GT", "ST"))
                                 for p in root.iterdir())


def read_labelled(path: str | Path, images_dir: str | Path | None = None) -> list[LabelledField]:
    """Labelled fields in any layout the tool takes: a COCO json (``images_dir``: its images), the Cell
    Tracking Challenge's (:func:`read_ctc`), a folder ``curate`` wrote (one folder a field, ``image.tif``
    and ``labels.tif``, as napari saves the corrected labels layer), or Usiigaci's (``raw.tif`` and
    ``instances_ids.png``)."""
    path = Path(path)
    if str(path).endswith(".json"):
        if not images_dir:
            raise ValueError("COCO annotations need --images-dir")
        return read_coco(path, images_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder or COCO json")
    if is_ctc(path):
        return read_ctc(path)
    if any((p / CURATED_IMAGE).exists() for p in path.iterdir() if p.is_dir()):
        return read_mask_folder(path, CURATED_IMAGE, CURATED_LABELS)
    return read_mask_folder(path)


def read_label_image(path: Path) -> np.ndarray:
    """An instance label image: TIFF (napari's labels layer saves uint8-uint32) or PNG."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        lab = np.asarray(tifffile.imread(path))
    else:
        lab = np.asarray(Image.open(path))
    return (lab[..., 0] if lab.ndim == 3 else lab).astype(np.int32)


def read_coco(annotations: str | Path, images_dir: str | Path) -> list[LabelledField]:
    """COCO json (polygon or RLE instances, LIVECell's format) into label images."""
    from pycocotools import mask as mask_utils

    coco = json.loads(Path(annotations).read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    fields = []
    for im in coco["images"]:
        h, w = im["height"], im["width"]
        lab = np.zeros((h, w), np.int32)
        for i, ann in enumerate(by_image.get(im["id"], []), start=1):
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rles = mask_utils.frPyObjects(seg, h, w)
                rle = mask_utils.merge(rles)
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            m = mask_utils.decode(rle).astype(bool)
            lab[m & (lab == 0)] = i
        img = normalize(read_image(str(Path(images_dir) / im["file_name"])))
        fields.append(LabelledField(Path(im["file_name"]).stem, img, lab))
    return fields


def write_yolo(fields: Iterable[LabelledField], out: str | Path, split: str) -> int:
    """Write images/<split>/*.png and labels/<split>/*.txt (class 0, normalised polygon)."""
    out = Path(out)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    n = 0
    for f in fields:
        h, w = f.image.shape
        Image.fromarray(f.image).save(out / "images" / split / f"{f.name}.png")
        lines = []
        for poly in label_polygons(f.labels):
            xy = (poly / np.array([w, h], np.float32)).clip(0, 1).reshape(-1)
            lines.append("0 " + " ".join(f"{v:.5f}" for v in xy))
        (out / "labels" / split / f"{f.name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        n += 1
    return n


def write_data_yaml(out: str | Path, splits: Sequence[str] = ("train", "val")) -> Path:
    """ultralytics data file for a single-class cell data set."""
    out = Path(out).resolve()
    cfg = {"path": str(out), "names": {0: "cell"}}
    for s in splits:
        cfg[s] = f"images/{s}"
    p = out / "data.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def split_names(names: Sequence[str], val: Sequence[str]) -> tuple[list[str], list[str]]:
    """Partition field names into train and validation by explicit validation names."""
    vs = set(val)
    return [n for n in names if n not in vs], [n for n in names if n in vs]
