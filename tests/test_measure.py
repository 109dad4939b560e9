"""The vectorised cell measurements against scikit-image's regionprops, the reference definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import ConvexHull
from skimage.draw import ellipse, polygon

from livecell_ray.measure import CELL_COLUMNS, convex_areas, measure_cells, measure_cells_regionprops


def _plate_of_shapes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping ellipses and concave polygons, some cut by the image edge, one cell in two pieces."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((260, 350), np.uint32)
    for i in range(160):
        if i % 3 == 0:
            rr, cc = ellipse(rng.uniform(-5, 265), rng.uniform(-5, 355), rng.uniform(0.6, 18), rng.uniform(0.6, 18),
                             shape=lab.shape, rotation=rng.uniform(0, np.pi))
        else:
            pts = rng.uniform(-14, 14, (7, 2)) + rng.uniform(0, [260, 350])
            rr, cc = polygon(pts[:, 0], pts[:, 1], shape=lab.shape)
        free = lab[rr, cc] == 0
        lab[rr[free], cc[free]] = i + 1
    lab[0:3, 0:3] = 161  # a second piece for the last label: labels need not be connected
    lab[250:255, 340:345] = 161
    present = np.unique(lab[lab > 0])
    relabel = np.zeros(lab.max() + 1, np.uint32)
    relabel[present] = np.arange(1, len(present) + 1)
    intensity = rng.integers(0, 4096, lab.shape).astype(np.uint16)
    return relabel[lab], intensity


def test_cell_measurements_equal_regionprops():
    labels, intensity = _plate_of_shapes()
    k = int(labels.max())
    cls, conf = np.zeros(k, np.int16), np.linspace(1, 0.3, k).astype(np.float32)
    fast = measure_cells(labels, intensity, cls, conf, pixel_size=0.5)
    ref = measure_cells_regionprops(labels, intensity, cls, conf, pixel_size=0.5)
    assert list(fast) == CELL_COLUMNS
    for col in CELL_COLUMNS:
        assert fast[col].dtype == ref[col].dtype, col
        if col == "solidity":
            continue
        # regionprops reads intensities as float32; ours are float64 sums
        tol = 1e-6 if col.endswith("intensity") else 1e-9
        np.testing.assert_allclose(fast[col], ref[col], rtol=tol, atol=1e-9, err_msg=col)
    # Solidity: our convex area is the hull of the pixel squares, so it is at most 1 and a little below
    # regionprops' (whose hull passes through edge midpoints); close on cells of real size.
    assert (fast["solidity"] > 0).all() and (fast["solidity"] <= 1 + 1e-12).all()
    big = fast["area_px"] >= 100
    assert big.sum() > 50
    assert np.abs(fast["solidity"] - ref["solidity"])[big].max() < 0.08
    assert fast["solidity"][big].mean() < ref["solidity"][big].mean()


def test_convex_areas_equal_hull_of_pixel_squares():
    labels, _ = _plate_of_shapes(seed=3)
    k = int(labels.max())
    expected = []
    for i in range(1, k + 1):
        y, x = np.nonzero(labels == i)
        corners = np.concatenate([np.stack([y + dy, x + dx], 1) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])
        expected.append(ConvexHull(corners).volume)
    np.testing.assert_allclose(convex_areas(labels, k), expected, rtol=1e-12)


def test_single_pixel_and_line_cells():
    labels = np.zeros((5, 8), np.uint32)
    labels[2, 2] = 1
    labels[0, 4:8] = 2  # a one-pixel-high line along the top edge
    m = measure_cells(labels, np.ones_like(labels), np.zeros(2, np.int16), np.ones(2, np.float32))
    np.testing.assert_array_equal(m["area_px"], [1, 4])
    np.testing.assert_array_equal(m["solidity"], [1.0, 1.0])
    np.testing.assert_array_equal(m["eccentricity"], [0.0, 1.0])
    ref = measure_cells_regionprops(labels, np.ones_like(labels), np.zeros(2, np.int16), np.ones(2, np.float32))
    np.testing.assert_allclose(m["perimeter_px"], ref["perimeter_px"])


def test_missing_label_is_an_error_and_empty_field_is_empty():
    labels = np.zeros((10, 10), np.uint32)
    labels[1:3, 1:3] = 1
    labels[5:7, 5:7] = 3  # label 2 painted nowhere
    with pytest.raises(ValueError, match="3 instances were painted"):
        measure_cells(labels, labels, np.zeros(3, np.int16), np.ones(3, np.float32))
    empty = measure_cells(np.zeros((4, 4), np.uint32), np.zeros((4, 4)), np.zeros(0, np.int16), np.zeros(0, np.float32))
    assert list(empty) == CELL_COLUMNS and all(len(v) == 0 for v in empty.values())
