"""Per-cell and per-field statistics from a label image (scikit-image regionprops)."""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.measure import regionprops_table

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


def measure_cells(labels: np.ndarray, intensity: np.ndarray, class_ids: np.ndarray,
                  confidences: np.ndarray, pixel_size: float | None = None) -> dict[str, np.ndarray]:
    """One row per label 1..K (label k's class and confidence are entries k-1 of the arrays).

    Intensity is the raw image (grey), so statistics stay in the camera's units.
    """
    k = len(confidences)
    if k == 0:
        empty = {c: np.zeros(0, np.float64) for c in CELL_COLUMNS}
        empty["label"] = np.zeros(0, np.uint32)
        empty["class_id"] = np.zeros(0, np.int16)
        empty["confidence"] = np.zeros(0, np.float32)
        empty["area_px"] = np.zeros(0, np.int64)
        return empty
    props = regionprops_table(labels.astype(np.int64, copy=False), intensity_image=intensity.astype(np.float32),
                              properties=CELL_PROPERTIES)
    out: dict[str, np.ndarray] = {_RENAME.get(k_, k_): v for k_, v in props.items()}
    lab = out["label"].astype(np.uint32)
    if len(lab) != k or not np.array_equal(lab, np.arange(1, k + 1, dtype=np.uint32)):
        raise ValueError(f"label image holds labels {lab[:5]}... but {k} instances were painted")
    out["label"] = lab
    out["class_id"] = np.asarray(class_ids, np.int16)
    out["confidence"] = np.asarray(confidences, np.float32)
    out["area_px"] = out["area_px"].astype(np.int64)
    out["area_um2"] = (out["area_px"] * pixel_size**2 if pixel_size else np.full(k, np.nan))
    for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"):
        out[c] = out[c].astype(np.int32)
    return {c: out[c] for c in CELL_COLUMNS}


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
