"""Per-cell and per-field statistics from a label image, for every cell at once.

scikit-image's ``regionprops`` visits one region at a time: about 0.4 ms per cell, so a field of 600
cells costs more CPU than the network's forward pass. Here each statistic is one pass over the whole
label image (``np.bincount`` and ``scipy.ndimage``), defined exactly as regionprops defines it (area,
centroid, bbox, perimeter with 4-connectivity, inertia axes, eccentricity, intensity mean and std;
``tests/test_measure.py`` checks them against regionprops). The one deliberate difference is the convex
area behind solidity: the area of the convex hull of the cell's pixel squares (a polygon, so solidity
is in (0, 1]) rather than regionprops' count of pixel centres inside a hull through edge midpoints.
:func:`measure_cells_regionprops` keeps the regionprops path as the reference (and the seed-style loop
of ``benchmarks/throughput.py``).
"""

from __future__ import annotations

from math import sqrt
from typing import Any

import numpy as np
from scipy import ndimage

CELL_PROPERTIES = ("label", "area", "perimeter", "centroid", "bbox", "axis_major_length",
                   "axis_minor_length", "eccentricity", "solidity", "intensity_mean", "intensity_std")

_RENAME = {
    "area": "area_px", "perimeter": "perimeter_px", "centroid-0": "centroid_y", "centroid-1": "centroid_x",
    "bbox-0": "bbox_y0", "bbox-1": "bbox_x0", "bbox-2": "bbox_y1", "bbox-3": "bbox_x1",
    "axis_major_length": "major_axis_px", "axis_minor_length": "minor_axis_px",
    "intensity_mean": "mean_intensity", "intensity_std": "std_intensity",
}

CELL_COLUMNS = ["label", "class_id", "confidence", "area_px", "area_um2", "perimeter_px", "centroid_y",
                "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "major_axis_px", "minor_axis_px",
                "eccentricity", "solidity", "mean_intensity", "std_intensity"]

# skimage.measure.perimeter(neighborhood=4): a border pixel's code is 1 + 2 x (4-neighbours on the border)
# + 10 x (diagonal neighbours on the border); each code has a length.
_PERIMETER_WEIGHTS = np.zeros(50, np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + sqrt(2)) / 2
_SIDES = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAGONALS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def _empty() -> dict[str, np.ndarray]:
    out = {c: np.zeros(0, np.float64) for c in CELL_COLUMNS}
    out.update(label=np.zeros(0, np.uint32), class_id=np.zeros(0, np.int16), confidence=np.zeros(0, np.float32),
               area_px=np.zeros(0, np.int64))
    for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"):
        out[c] = np.zeros(0, np.int32)
    return out


def _finish(out: dict[str, np.ndarray], k: int, class_ids: np.ndarray, confidences: np.ndarray,
            pixel_size: float | None) -> dict[str, np.ndarray]:
    out["label"] = np.arange(1, k + 1, dtype=np.uint32)
    out["class_id"] = np.asarray(class_ids, np.int16)
    out["confidence"] = np.asarray(confidences, np.float32)
    out["area_px"] = np.asarray(out["area_px"]).astype(np.int64)
    out["area_um2"] = out["area_px"] * pixel_size**2 if pixel_size else np.full(k, np.nan)
    for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"):
        out[c] = np.asarray(out[c]).astype(np.int32)
    return {c: out[c] for c in CELL_COLUMNS}


def perimeters(labels: np.ndarray, k: int) -> np.ndarray:
    """skimage.measure.perimeter (4-connectivity) of labels 1..k, all in one pass.

    A pixel is on its cell's border when a 4-neighbour belongs to another label (or lies outside the
    image); its code counts the neighbours on the same cell's border, as skimage's convolution does.
    """
    p = np.pad(labels, 1)
    h, w = labels.shape
    core = p[1:-1, 1:-1]

    def shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
        return a[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    border = np.zeros_like(core, dtype=bool)
    for dy, dx in _SIDES:
        border |= shifted(p, dy, dx) != core
    border &= core != 0
    b = np.pad(border, 1)
    code = border.astype(np.uint8)
    for weight, offsets in ((2, _SIDES), (10, _DIAGONALS)):
        for dy, dx in offsets:
            code += weight * (shifted(b, dy, dx) & (shifted(p, dy, dx) == core)).astype(np.uint8)
    on = border.ravel()
    return np.bincount(core.ravel()[on], weights=_PERIMETER_WEIGHTS[code.ravel()[on]], minlength=k + 1)[1:]


def _hull_side_integral(cell: np.ndarray, u: np.ndarray, v: np.ndarray, k: int, lower: bool) -> np.ndarray:
    """Per cell, the integral over u of the convex minorant (lower) or concave majorant of points v(u).

    Points come sorted by (cell, u) with unique u per cell. Points on or beyond the chord between their
    neighbours are not hull vertices and all go at once; repeating until none goes leaves the hull's
    side (a vectorised monotone chain). Coordinates are half-integers, so the tests are exact.
    """
    vv = v if lower else -v
    alive = np.arange(len(u))
    while len(alive) > 2:
        c, uu, w = cell[alive], u[alive], vv[alive]
        inner = (c[1:-1] == c[:-2]) & (c[1:-1] == c[2:])
        beyond = (w[1:-1] - w[:-2]) * (uu[2:] - uu[:-2]) >= (w[2:] - w[:-2]) * (uu[1:-1] - uu[:-2])
        drop = inner & beyond
        if not drop.any():
            break
        keep = np.ones(len(alive), bool)
        keep[1:-1] = ~drop
        alive = alive[keep]
    c, uu, w = cell[alive], u[alive], v[alive]
    same = c[1:] == c[:-1]
    trapezoids = np.where(same, (uu[1:] - uu[:-1]) * (w[1:] + w[:-1]) / 2, 0.0)
    return np.bincount(c[1:], weights=trapezoids, minlength=k + 1)[1:]


def convex_areas(labels: np.ndarray, k: int) -> np.ndarray:
    """Area of the convex hull of each cell's pixel squares (1 x 1 squares centred on the pixels).

    Row by row a cell spans [leftmost pixel - 1/2, rightmost + 1/2]; the hull is bounded by the convex
    minorant of the left ends and the concave majorant of the right ends, so its area is the integral
    of their difference, for all cells at once.
    """
    w = labels.shape[1]
    flat = labels.ravel()
    change = np.ones(flat.size, bool)
    change[1:] = flat[1:] != flat[:-1]
    change[::w] = True
    starts = np.flatnonzero(change)
    ends = np.r_[starts[1:], flat.size] - 1
    run_lab = flat[starts]
    on = run_lab != 0
    starts, ends, run_lab = starts[on], ends[on], run_lab[on].astype(np.int64)
    order = np.argsort(run_lab, kind="stable")  # by cell, then (raveled order) by row and x
    starts, ends, run_lab = starts[order], ends[order], run_lab[order]
    y, x0 = np.divmod(starts, w)
    x1 = ends % w
    first = np.r_[True, (run_lab[1:] != run_lab[:-1]) | (y[1:] != y[:-1])]
    g = np.flatnonzero(first)
    g_cell, g_y = run_lab[g], y[g]
    g_left = x0[g] - 0.5  # the first run of a (cell, row) starts leftmost ...
    g_right = np.maximum.reduceat(x1, g) + 0.5  # ... the right end is the max over its runs
    # Two points per (cell, row), at the row's top and bottom edges; neighbouring rows share an edge.
    cell = np.repeat(g_cell, 2)
    u = np.stack([g_y - 0.5, g_y + 0.5], 1).ravel()
    area = np.zeros(k, np.float64)
    for side, lower in ((g_left, True), (g_right, False)):
        v = np.repeat(side, 2)
        new = np.r_[True, (cell[1:] != cell[:-1]) | (u[1:] != u[:-1])]
        idx = np.flatnonzero(new)
        merged = np.minimum.reduceat(v, idx) if lower else np.maximum.reduceat(v, idx)
        integral = _hull_side_integral(cell[idx], u[idx], merged, k, lower)
        area += -integral if lower else integral
    return area


def measure_cells(labels: np.ndarray, intensity: np.ndarray, class_ids: np.ndarray,
                  confidences: np.ndarray, pixel_size: float | None = None) -> dict[str, np.ndarray]:
    """One row per label 1..K (label k's class and confidence are entries k-1 of the arrays).

    Intensity is the raw image (grey), so statistics stay in the camera's units. Every label 1..K
    must have pixels (painting guarantees it); anything else is an error, not a silent gap.
    """
    k = len(confidences)
    if k == 0:
        return _empty()
    flat = labels.ravel().astype(np.int64, copy=False)
    area = np.bincount(flat, minlength=k + 1)[1:]
    if len(area) != k or (area == 0).any():
        present = np.flatnonzero(np.bincount(flat)[1:]) + 1
        raise ValueError(f"label image holds labels {present[:5]}... but {k} instances were painted")
    w = labels.shape[1]
    fg = flat != 0
    lab = flat[fg]
    idx = np.flatnonzero(fg)
    y, x = np.divmod(idx, w)
    y = y.astype(np.float64)
    x = x.astype(np.float64)
    cy = np.bincount(lab, weights=y, minlength=k + 1)[1:] / area
    cx = np.bincount(lab, weights=x, minlength=k + 1)[1:] / area
    dy, dx = y - cy[lab - 1], x - cx[lab - 1]
    # Central moments / area = skimage's inertia tensor [[mu02, -mu11], [-mu11, mu20]] / mu00.
    a = np.bincount(lab, weights=dx * dx, minlength=k + 1)[1:] / area
    c = np.bincount(lab, weights=dy * dy, minlength=k + 1)[1:] / area
    b = -np.bincount(lab, weights=dx * dy, minlength=k + 1)[1:] / area
    mid, root = (a + c) / 2, np.sqrt(((a - c) / 2) ** 2 + b**2)
    l1, l2 = np.clip(mid + root, 0, None), np.clip(mid - root, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 == 0, 0.0, np.sqrt(np.clip(1 - l2 / l1, 0, None)))
    vals = intensity.ravel()[fg].astype(np.float64)
    mean = np.bincount(lab, weights=vals, minlength=k + 1)[1:] / area
    std = np.sqrt(np.bincount(lab, weights=(vals - mean[lab - 1]) ** 2, minlength=k + 1)[1:] / area)
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=k)
    bbox = np.array([(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in boxes], np.int64)
    out = {"area_px": area, "perimeter_px": perimeters(labels, k), "centroid_y": cy, "centroid_x": cx,
           "bbox_y0": bbox[:, 0], "bbox_x0": bbox[:, 1], "bbox_y1": bbox[:, 2], "bbox_x1": bbox[:, 3],
           "major_axis_px": 4 * np.sqrt(l1), "minor_axis_px": 4 * np.sqrt(l2), "eccentricity": ecc,
           "solidity": area / convex_areas(labels, k), "mean_intensity": mean, "std_intensity": std}
    return _finish(out, k, class_ids, confidences, pixel_size)


def measure_cells_regionprops(labels: np.ndarray, intensity: np.ndarray, class_ids: np.ndarray,
                              confidences: np.ndarray, pixel_size: float | None = None
                              ) -> dict[str, np.ndarray]:
    """The same table through scikit-image's regionprops, one region at a time (the reference)."""
    from skimage.measure import regionprops_table

    k = len(confidences)
    if k == 0:
        return _empty()
    props = regionprops_table(labels.astype(np.int64, copy=False), intensity_image=intensity.astype(np.float32),
                              properties=CELL_PROPERTIES)
    out: dict[str, np.ndarray] = {_RENAME.get(k_, k_): v for k_, v in props.items()}
    lab = out["label"].astype(np.uint32)
    if len(lab) != k or not np.array_equal(lab, np.arange(1, k + 1, dtype=np.uint32)):
        raise ValueError(f"label image holds labels {lab[:5]}... but {k} instances were painted")
    return _finish(out, k, class_ids, confidences, pixel_size)


def measure_field(labels: np.ndarray, intensity: np.ndarray) -> dict[str, Any]:
    """Cell count, confluence (fraction of pixels covered by cells), mean intensity, size."""
    covered = labels > 0
    return {
        "n_cells": int(labels.max()) if labels.size else 0,
        "confluence": float(covered.mean()) if labels.size else 0.0,
        "mean_intensity": float(np.mean(intensity)) if intensity.size else float("nan"),
        "height": int(labels.shape[0]),
        "width": int(labels.shape[1]),
    }
