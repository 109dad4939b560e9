"""Copy-paste synthetic expansion of a labelled training set (the seed study's proposal).

Cells are cut out of the training fields with their exact masks and pasted onto backgrounds: the
same fields with their labelled cells removed (inpainted), and, where given, unlabelled fields of the
same instrument with every textured (cell) region removed, which is how one annotated field becomes
many real-looking ones. Pasted at random scale, rotation, flip and intensity, at densities up to
confluence (each cell placed where it overlaps least of a few tries, as cells tile a dense well).
Labels stay exact: a pasted cell takes the pixels of its mask, cells it
covers lose those pixels, and a cell left with under ``min_visible`` of its area is dropped.
Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from livecell_ray.training.dataset import LabelledField


@dataclass(frozen=True)
class CopyPasteConfig:
    """Ranges of the random transforms."""

    scale: tuple[float, float] = (0.7, 1.4)
    intensity: tuple[float, float] = (0.85, 1.15)
    density: tuple[float, float] = (0.5, 2.0)  # times the mean cell count of the sources
    cells: tuple[int, int] | None = None  # absolute cells per field (overrides density), e.g. up to confluence
    min_visible: float = 0.4
    margin: int = 3
    tries: int = 1  # positions tried per cell, the least-overlapping kept (1: uniform placement, as before)


@dataclass(frozen=True)
class Cell:
    patch: np.ndarray  # uint8 image around the cell
    mask: np.ndarray  # bool, same shape


def background(f: LabelledField, dilate: int = 9) -> np.ndarray:
    """The field with its cells removed (Telea inpainting of the dilated cell mask)."""
    m = (f.labels > 0).astype(np.uint8)
    m = cv2.dilate(m, np.ones((dilate, dilate), np.uint8))
    return cv2.inpaint(f.image, m, 5, cv2.INPAINT_TELEA)


def texture_background(image: np.ndarray, window: int = 9, dilate: int = 11,
                       max_masked: float = 0.5) -> np.ndarray | None:
    """An unlabelled field with its cells removed, or None when cells cover too much of it to inpaint.

    Phase-contrast background is flat (only camera noise) while cells carry halos and texture, so the
    local standard deviation separates the two without any model: Otsu's threshold on it, dilated to
    take in the halos, then Telea inpainting as for labelled fields.
    """
    img = image.astype(np.float32)
    mean = cv2.blur(img, (window, window))
    sd = np.sqrt(np.maximum(cv2.blur(img * img, (window, window)) - mean * mean, 0))
    sd8 = np.clip(sd * (255.0 / max(float(sd.max()), 1e-6)), 0, 255).astype(np.uint8)
    _, m = cv2.threshold(sd8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    m = cv2.dilate(m, np.ones((dilate, dilate), np.uint8))
    if float(m.mean()) > max_masked:
        return None
    return cv2.inpaint(image, m, 5, cv2.INPAINT_TELEA)


def cell_bank(fields: list[LabelledField], margin: int = 3, min_area: int = 20) -> list[Cell]:
    """Every labelled cell that does not touch the border, with a small margin of context."""
    cells = []
    for f in fields:
        h, w = f.labels.shape
        for lab in np.unique(f.labels):
            if lab == 0:
                continue
            ys, xs = np.nonzero(f.labels == lab)
            if len(ys) < min_area or ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1:
                continue
            y0, y1 = max(0, ys.min() - margin), min(h, ys.max() + margin + 1)
            x0, x1 = max(0, xs.min() - margin), min(w, xs.max() + margin + 1)
            cells.append(Cell(f.image[y0:y1, x0:x1].copy(), f.labels[y0:y1, x0:x1] == lab))
    return cells


def _transform(cell: Cell, rng: np.random.Generator, cfg: CopyPasteConfig) -> tuple[np.ndarray, np.ndarray]:
    s = rng.uniform(*cfg.scale)
    angle = rng.uniform(0, 360)
    patch, mask = cell.patch.astype(np.float32), cell.mask.astype(np.uint8)
    if rng.random() < 0.5:
        patch, mask = patch[:, ::-1], mask[:, ::-1]
    h, w = patch.shape
    diag = int(np.ceil(np.hypot(h, w) * s)) + 2
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, s)
    m[:, 2] += (diag / 2 - w / 2, diag / 2 - h / 2)
    p = cv2.warpAffine(np.ascontiguousarray(patch), m, (diag, diag), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT)
    k = cv2.warpAffine(np.ascontiguousarray(mask), m, (diag, diag), flags=cv2.INTER_NEAREST) > 0
    p = p * rng.uniform(*cfg.intensity)
    return p, k


def synthesize(fields: list[LabelledField], n: int, seed: int = 0,
               cfg: CopyPasteConfig | None = None, prefix: str = "synth",
               backgrounds: list[np.ndarray] | None = None) -> list[LabelledField]:
    """N new fields with exact instance labels, on the fields' own backgrounds and any extra ones given."""
    cfg = cfg or CopyPasteConfig()
    rng = np.random.default_rng(seed)
    bank = cell_bank(fields, cfg.margin)
    if not bank:
        raise ValueError("no complete cells to copy (all touch the border or are tiny)")
    backs = [background(f) for f in fields] + list(backgrounds or [])
    mean_count = np.mean([len(np.unique(f.labels)) - 1 for f in fields])
    out = []
    for i in range(n):
        bg = backs[rng.integers(len(backs))].astype(np.float32)
        if rng.random() < 0.5:
            bg = bg[::-1]
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        img = bg.copy()
        h, w = img.shape
        labels = np.zeros((h, w), np.int32)
        if cfg.cells:
            target = int(rng.integers(cfg.cells[0], cfg.cells[1] + 1))
        else:
            target = max(1, int(round(mean_count * rng.uniform(*cfg.density))))
        areas: dict[int, int] = {}
        for lab in range(1, target + 1):
            p, k = _transform(bank[rng.integers(len(bank))], rng, cfg)
            ph, pw = k.shape
            if ph >= h or pw >= w or not k.any():
                continue
            best = None
            for _ in range(max(1, cfg.tries)):
                y, x = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
                covered = int(np.count_nonzero(labels[y:y + ph, x:x + pw][k]))
                if best is None or covered < best[0]:
                    best = (covered, y, x)
                if covered == 0:
                    break
            _, y, x = best
            region = img[y:y + ph, x:x + pw]
            region[k] = p[k]
            labels[y:y + ph, x:x + pw][k] = lab
            areas[lab] = int(k.sum())
        # Drop cells mostly hidden under later ones; renumber 1..K.
        counts = np.bincount(labels.ravel(), minlength=target + 1)
        keep = [lab for lab, a in areas.items() if counts[lab] >= cfg.min_visible * a]
        remap = np.zeros(target + 1, np.int32)
        remap[keep] = np.arange(1, len(keep) + 1)
        labels = remap[labels]
        out.append(LabelledField(f"{prefix}{i:04d}", np.clip(img + 0.5, 0, 255).astype(np.uint8), labels))
    return out
