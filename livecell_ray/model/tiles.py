"""Fields at the model's scale: resampling to its pixel size, overlapping tiles for fields larger than its
input, and the tiles' cells merged back into one label image of the field's own pixels.

The seam rule: tiles overlap by ``overlap`` pixels (more than a cell is wide); the field is split into
cores, one a tile, at the middle of each overlap. A tile keeps the cells whose centroid lies in its
core (grown by a few pixels, so that a cell whose centroid falls on a core boundary in both tiles'
slightly different masks is not lost), which a cell cut by the tile's edge never does while it is
narrower than half the overlap. A cell that two tiles both keep is recognised by its mask: when more
than half of it is already labelled, it is the same cell and the later copy is dropped; otherwise only
its unlabelled pixels are painted (the labels never overlap, as for whole fields).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: A field of unknown pixel size up to this many times the network's input is letterboxed whole (as before
#: pixel sizes were read), not tiled: the scale it would be tiled at is a guess too, and letterboxing a
#: Usiigaci field (1024 px, 0.87 um/px) to small.pt's 832 does well enough (held-out mask AP 0.362, 0.352
#: resampled with --pixel-size 0.867). Beyond it (a full 1408 px Incucyte frame, a stitched well)
#: letterboxing loses more than a third of the resolution.
LETTERBOX_MAX = 1.5
#: Pixels a core is grown by before the centroid test (duplicates this admits are dropped by overlap).
CORE_MARGIN = 8
#: A kept cell more than this fraction of which is already labelled is a copy from a neighbouring tile.
DUPLICATE_FRACTION = 0.5
#: Pixels :func:`map_back` maps at a time (its index arrays are 8 bytes a pixel).
MAP_BACK_BLOCK = 1 << 22


def resampled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(h, w) of a field of this shape resampled by ``scale`` (what :func:`resample` makes)."""
    h, w = shape
    return (h, w) if scale == 1.0 else (max(16, round(h * scale)), max(16, round(w * scale)))


def resample(image: np.ndarray, scale: float) -> np.ndarray:
    """The image with its pixels scaled by ``scale`` (area averaging down, bilinear up), same dtype."""
    import cv2

    h, w = resampled_shape(image.shape, scale)
    if (h, w) == image.shape:
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: tiles of ``tile`` px overlapping by at least ``overlap``, the last flush."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    return [*range(0, length - tile, step), length - tile]


def cores(origins: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Each tile's core along one axis: from the middle of its overlap with the previous tile to the middle
    of its overlap with the next; the cores partition [0, length)."""
    if len(origins) == 1:
        return [(0, length)]
    bounds = [(origins[k + 1] + origins[k] + min(tile, length)) // 2 for k in range(len(origins) - 1)]
    edges = [0, *bounds, length]
    return [(edges[k], edges[k + 1]) for k in range(len(origins))]


@dataclass(frozen=True)
class Tile:
    """One tile of a field: where it sits, and the core whose cells it keeps."""

    y: int
    x: int
    h: int
    w: int
    core_y: tuple[int, int]
    core_x: tuple[int, int]


def plan(shape: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """The tiles of a field of this shape (row by row)."""
    h, w = shape
    ys, xs = starts(h, tile, overlap), starts(w, tile, overlap)
    cy, cx = cores(ys, tile, h), cores(xs, tile, w)
    return [Tile(y, x, min(tile, h), min(tile, w), cy[i], cx[j]) for i, y in enumerate(ys) for j, x in enumerate(xs)]


def merge(shape: tuple[int, int], tiles: list[Tile], labels: list[np.ndarray], confidences: list[np.ndarray],
          class_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label image (1..K, no overlaps) with each cell once, from the tiles' own label images."""
    return merge_stream(shape, tiles, zip(labels, confidences, class_ids))


def merge_stream(shape: tuple[int, int], tiles: list[Tile],
                 results: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`merge` of the tiles' (labels, confidences, class ids) as they come: a tile's results can be
    dropped once painted, so a field of hundreds of tiles never holds them all."""
    m = Merger(shape[1], shape[0])
    for t, (lab, c, k) in zip(tiles, results):
        m.add(t, lab, c, k)
    return m.labels, *m.scores()


class Merger:
    """Tiles' cells painted into one label image (1..K in the order kept, no overlaps), tile by tile.

    Tile by tile, every cell of a tile at once: a tile's cells never overlap each other, so whether one
    is kept (centroid in the core, at most half of it labelled already) depends only on the tiles
    before it, and painting them together gives exactly what painting them one by one in label order
    does (tests/test_plates.py holds it to that), at a fraction of the time on a field of 100,000 cells.

    The label image is held from row ``top`` on: a field streamed a tile row at a time
    (livecell_ray.pipeline.stream) drops the rows no later tile can reach (:meth:`drop`), so it holds a few tile
    rows, never the field; a whole field's is allocated at once (``height``).
    """

    def __init__(self, width: int, height: int = 0):
        self.labels = np.zeros((height, width), np.uint32)
        self.top = 0
        self.n_kept = 0
        self._conf: list[np.ndarray] = []
        self._cls: list[np.ndarray] = []

    def window(self, t: Tile, h: int, w: int) -> np.ndarray:
        """The held labels under a tile's h x w results (rows added as the tile needs them)."""
        need = t.y + h - self.top - self.labels.shape[0]
        if need > 0:
            self.labels = np.concatenate([self.labels, np.zeros((need, self.labels.shape[1]), np.uint32)])
        return self.labels[t.y - self.top:t.y - self.top + h, t.x:t.x + w]

    def add(self, t: Tile, lab: np.ndarray, c: np.ndarray, k: np.ndarray) -> int:
        """Paint one tile's kept cells (labels n_kept+1...); returns how many it kept."""
        from scipy import ndimage

        n = int(lab.max(initial=0))
        if n == 0:
            return 0
        window = self.window(t, *lab.shape)
        flat = lab.ravel().astype(np.int64)
        area = np.bincount(flat, minlength=n + 1)[1:]
        present = np.flatnonzero(area) + 1
        n_px = area[present - 1]
        # Centroids as the reference computes them: the tile's offset plus the cell's box corner, plus the
        # mean of its pixels' coordinates within that box (exact integer sums, one float division).
        boxes = ndimage.find_objects(lab)
        y0 = np.array([boxes[i - 1][0].start for i in present], np.int64)
        x0 = np.array([boxes[i - 1][1].start for i in present], np.int64)
        ys, xs = np.divmod(np.arange(flat.size, dtype=np.int64), lab.shape[1])
        sy = np.bincount(flat, weights=ys, minlength=n + 1)[present] - n_px * y0
        sx = np.bincount(flat, weights=xs, minlength=n + 1)[present] - n_px * x0
        cy = (t.y + y0) + sy / n_px
        cx = (t.x + x0) + sx / n_px
        inside = ((t.core_y[0] - CORE_MARGIN <= cy) & (cy < t.core_y[1] + CORE_MARGIN)
                  & (t.core_x[0] - CORE_MARGIN <= cx) & (cx < t.core_x[1] + CORE_MARGIN))
        taken = np.bincount(flat, weights=(window.ravel() != 0), minlength=n + 1)[present]
        keep = present[inside & ~(taken / n_px > DUPLICATE_FRACTION)]
        if not len(keep):
            return 0
        new_id = np.zeros(n + 1, np.uint32)
        new_id[keep] = np.arange(self.n_kept + 1, self.n_kept + 1 + len(keep), dtype=np.uint32)
        paint = new_id[lab] * (window == 0)
        np.copyto(window, paint, where=paint > 0)
        self._conf.append(np.asarray(c, np.float32)[keep - 1])
        self._cls.append(np.asarray(k, np.int16)[keep - 1])
        self.n_kept += len(keep)
        return len(keep)

    def drop(self, upto: int) -> None:
        """Forget the rows above ``upto`` (no later tile reaches them)."""
        cut = min(max(0, upto - self.top), self.labels.shape[0])
        self.labels = self.labels[cut:].copy()
        self.top += cut

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(confidences, class ids) of the cells kept so far, in label order."""
        return (np.concatenate(self._conf) if self._conf else np.zeros(0, np.float32),
                np.concatenate(self._cls) if self._cls else np.zeros(0, np.int16))


def source_rows(n_field: int, n_model: int) -> np.ndarray:
    """For each of a field's n_field rows (or columns), the row at the model's scale its label is taken from
    (the nearest pixel centre): :func:`map_back`'s rule, shared with the streamed path."""
    return np.minimum(((np.arange(n_field) + 0.5) * n_model / n_field).astype(np.int64), n_model - 1)


def map_back(labels: np.ndarray, confidences: np.ndarray, class_ids: np.ndarray, shape: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels at the model's scale onto the field's own pixel grid (nearest pixel centre), renumbered 1..K
    in the same order; a cell too small to cover any field pixel is dropped with its score."""
    h, w = shape
    mh, mw = labels.shape
    if (mh, mw) == (h, w):
        return labels, confidences, class_ids
    rows, cols = source_rows(h, mh), source_rows(w, mw)
    # In blocks of rows: the index arrays numpy makes for a gather are 8 bytes a pixel, a stitched well's
    # field would need them whole.
    step = max(1, MAP_BACK_BLOCK // max(1, w))
    back = np.empty((h, w), labels.dtype)
    present = np.zeros(len(confidences) + 1, bool)
    for a in range(0, h, step):
        block = back[a:a + step]
        np.take(labels[rows[a:a + step]], cols, axis=1, out=block)
        present[block] = True
    present[0] = False
    renum = np.zeros(len(present), labels.dtype)
    renum[present] = np.arange(1, int(present.sum()) + 1, dtype=labels.dtype)
    for a in range(0, h, step):
        np.take(renum, back[a:a + step], out=back[a:a + step])
    kept = present[1:]
    return back, confidences[kept], class_ids[kept]
