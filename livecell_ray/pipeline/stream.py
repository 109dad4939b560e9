"""A field too large to hold whole (a stitched well, a slide scan): read, segmented, measured and written a
band of rows at a time, so that memory does not grow with its height.

A file of ``SegmentConfig.stream_mb`` or more goes this way (:func:`livecell_ray.pipeline.process_shard`);
every other field is read whole, as before. One tile row (``tiles.plan`` at the model's working scale)
at a time:

    the file's rows (:class:`RowReader`: strips or tiles of a TIFF read as needed, never the file)
    -> normalised with the whole field's percentiles (one pass over its rows first, the same sample
       :func:`imaging.normalize` takes, so the same lookup table)
    -> resampled to the working scale (only the rows this tile row needs)
    -> its tiles segmented by the model replica, a network batch at a time
    -> merged into a label image that holds a few tile rows (:class:`tiles.Merger`, the whole-field rule)
    -> working rows no later tile can reach, mapped back to the field's own pixels (``tiles.map_back``'s
       nearest-centre rule; a cell that covers no field pixel is known the moment it is painted, so
       labels are final as they come)
    -> field rows held until their Zarr chunk row is complete (written: chunks of CHUNK x CHUNK) and
       every cell in them is complete (measured by ``measure_cells`` on just those rows, as it would
       measure them in the whole field: the same numbers).

At the model's own scale the result is the whole-field path's, label for label and number for number
(tests/test_stream.py); resampled, each tile row's band is resampled on its own (to within half a pixel of
resampling the field whole), so a few cells along band edges may differ slightly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from scipy import ndimage

from livecell_ray.config import NormalizeConfig
from livecell_ray.measure import measure_cells
from livecell_ray.model import tiles as tiles_mod
from livecell_ray.plate import imaging

#: A streamed field's Zarr chunks (y, x): one chunk row of the field is held until it is written.
CHUNK = 1024
#: Rows read at a time by the first pass (the percentiles' sample); a multiple of 4 (the sample's stride).
PASS_ROWS = 1024


class RowReader:
    """A grey single-plane image's rows on demand.

    A TIFF's plane is read where it lies: an uncompressed contiguous one by seeking to the rows; a striped
    or tiled one through tifffile's Zarr view of its strips or tiles (only those under the rows asked
    for are decoded). Anything else (another format, several planes or colours to choose from) is read
    whole by :func:`imaging.read_image_with_info`, with its checks and errors, and served from memory.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 planes: imaging.Planes | None = None):
        self.url = url
        self._file: Any = None
        self._array: Any = None
        self._offset: int | None = None
        self.info = imaging.ImageInfo()
        planes = planes or imaging.Planes()
        try:
            self._open_tiff(storage_options or {}, planes)
        except Exception:
            self.close()
            self._file = self._array = self._offset = None
        if self._file is None:
            arr, self.info = imaging.read_image_with_info(url, storage_options, max_pixels=2**62, planes=planes)
            self._array = arr
            self.shape, self.dtype = arr.shape, arr.dtype

    def _open_tiff(self, storage_options: dict[str, Any], planes: imaging.Planes) -> None:
        import tifffile
        import zarr

        self._file = fsspec.open(self.url, "rb", **storage_options).open()
        tif = tifffile.TiffFile(self._file)
        series = tif.series[0]
        page = series.pages[0] if series.pages else tif.pages[0]
        if series.axes != "YX" or len(tif.pages) != 1 or planes.channel not in (None, "0") \
                or planes.plane not in (None, 0):
            raise ValueError("not one grey plane")  # read whole: imaging chooses the plane or says why not
        self.info = imaging.tiff_info(tif)
        self.shape = tuple(int(n) for n in series.shape)
        dtype = np.dtype(series.dtype)
        self.dtype = dtype.newbyteorder("=")
        if int(page.compression) == 1 and page.is_contiguous and int(getattr(page, "predictor", 1)) == 1:
            self._offset = int(page.dataoffsets[0])
            self._disk = dtype.newbyteorder(tif.byteorder)
        else:
            self._array = zarr.open(series.aszarr(), mode="r")
            self._tif = tif

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1, every column, in the file's units."""
        a, b = max(0, a), min(self.shape[0], b)
        if self._offset is not None:
            width = self.shape[1] * self._disk.itemsize
            self._file.seek(self._offset + a * width)
            data = self._file.read((b - a) * width)
            if len(data) != (b - a) * width:
                raise imaging.ImageError(f"{self.url}: truncated: rows {a}-{b - 1} of {self.shape[0]} need "
                                         f"{(b - a) * width} bytes at offset {self._offset + a * width}, the file "
                                         f"has {len(data)}")
            return np.frombuffer(data, self._disk).reshape(b - a, self.shape[1]).astype(self.dtype, copy=False)
        return np.asarray(self._array[a:b])

    def window(self, a: int, b: int, c: int, d: int) -> np.ndarray:
        return self.rows(a, b)[:, c:d]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def normaliser(reader: RowReader, cfg: NormalizeConfig | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The field's rows -> uint8, exactly as :func:`imaging.normalize` scales the whole field: the same
    every-4th-row-and-column sample, gathered in one pass over the rows."""
    h, w = reader.shape
    subsampled = h * w > imaging.SAMPLE_ABOVE
    parts = []
    for a in range(0, h, PASS_ROWS):
        band = reader.rows(a, a + PASS_ROWS)
        parts.append(band[::4, ::4] if subsampled else band)
    return imaging.normalizer(np.concatenate(parts), reader.dtype, subsampled, cfg)


def working_rows(norm_rows: Callable[[int, int], np.ndarray], shape: tuple[int, int],
                 working: tuple[int, int], a: int, b: int) -> np.ndarray:
    """Rows a..b-1 of the field resampled to ``working`` (h, w) (area averaging down, linear up, as
    :func:`tiles.resample` does), computed from just the field rows they lie on."""
    import cv2

    h, w = shape
    hw, ww = working
    if (hw, ww) == (h, w):
        return norm_rows(a, b)
    sy = h / hw  # field rows a working row spans
    if hw > h:  # enlarged: linear between the two nearest field rows (pixel centres), edges replicated
        src = (np.arange(a, b) + 0.5) * sy - 0.5
        lo = np.clip(np.floor(src).astype(np.int64), 0, h - 1)
        hi = np.minimum(lo + 1, h - 1)
        frac = np.clip(src - np.floor(src), 0, 1)[:, None].astype(np.float32)
        frac[src < 0] = 0
        r0, r1 = int(lo[0]), int(hi[-1]) + 1
        band = cv2.resize(norm_rows(r0, r1), (ww, r1 - r0), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        out = band[lo - r0] * (1 - frac) + band[hi - r0] * frac
    else:  # reduced: the mean over each working row's span of field rows (fractions at its ends)
        p = np.arange(a, b + 1) * sy
        r0, r1 = int(math.floor(p[0])), min(h, int(math.ceil(p[-1])))
        band = cv2.resize(norm_rows(r0, r1), (ww, r1 - r0), interpolation=cv2.INTER_AREA).astype(np.float64)
        cum = np.concatenate([np.zeros((1, ww)), np.cumsum(band, axis=0)])
        i = np.minimum(np.floor(p).astype(np.int64) - r0, r1 - r0 - 1)
        integral = cum[i] + (p - r0 - i)[:, None] * band[i]
        out = (integral[1:] - integral[:-1]) / sy
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass
class Streamed:
    """A streamed field's results: its cells (measure_cells' columns, in label order) and field statistics."""

    cells: dict[str, np.ndarray]
    stats: dict[str, Any]
    peak_rows: dict[str, int] = field(default_factory=dict)  # most rows each buffer held (memory's bound)
    seconds: dict[str, float] = field(default_factory=dict)


class _Cells:
    """Each cell's field rows (first, and its last working row), its final label, and whether measured."""

    def __init__(self) -> None:
        self.final = np.zeros(1, np.int64)  # merge id -> final label (0: covers no field pixel)
        self.top = np.zeros(0, np.int64)  # by final label - 1: first field row
        self.bottom_w = np.zeros(0, np.int64)  # by final label - 1: last working row
        self.measured = np.zeros(0, bool)
        self.n = 0

    def add(self, present: np.ndarray, top: np.ndarray, bottom_w: np.ndarray) -> None:
        """Cells just painted, in merge order: whether each covers a field pixel, its rows."""
        final = np.where(present, self.n + np.cumsum(present), 0)
        self.final = np.concatenate([self.final, final])
        self.top = np.concatenate([self.top, top[present]])
        self.bottom_w = np.concatenate([self.bottom_w, bottom_w[present]])
        self.measured = np.concatenate([self.measured, np.zeros(int(present.sum()), bool)])
        self.n += int(present.sum())


def segment_streamed(reader: RowReader, submit: Callable[[list[np.ndarray]], Callable[[], list[tuple]]],
                     working: tuple[int, int], plan: list[tiles_mod.Tile], pixel_size: float | None,
                     write_rows: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None],
                     to_u8: Callable[[np.ndarray], np.ndarray]) -> Streamed:
    """Segment, measure and write one field a tile row at a time (the module's docstring says how).

    ``submit``: uint8 tiles at the working scale -> a call that waits for each tile's (labels, confidences,
    class ids), the model's answers; the next tile row is submitted before this one is merged, so that
    the network and the merging overlap. ``write_rows(y, raw_rows, label_rows, uint8_rows)``: called with whole chunk
    rows of the field (``y`` a multiple of CHUNK) as they become final, top to bottom. ``working`` and
    ``plan``: the model's (``Segmenter.tiling``); ``to_u8``: :func:`normaliser`'s. Returns the cells and
    field statistics the whole field gives.
    """
    t0 = time.perf_counter()
    h, w = reader.shape
    field_rows_of = tiles_mod.source_rows(h, working[0])  # each field row's working row
    field_cols_of = tiles_mod.source_rows(w, working[1])
    sampled_rows = np.zeros(working[0], bool)
    sampled_rows[field_rows_of] = True
    sampled_cols = np.zeros(working[1], bool)
    sampled_cols[field_cols_of] = True
    merger = tiles_mod.Merger(working[1])
    cells = _Cells()
    out = Streamed(cells={}, stats={}, peak_rows={"working labels": 0, "field rows": 0})
    timing = {"read + normalise + resample": 0.0, "model": 0.0, "merge": 0.0, "map back + measure + write": 0.0}

    # Field rows held: [held, done) of labels, raw values and the normalised image.
    held = done = written = 0
    lab_rows = np.zeros((0, w), np.uint32)
    raw_rows = np.zeros((0, w), reader.dtype)
    img_rows = np.zeros((0, w), np.uint8)
    measured: list[dict[str, np.ndarray]] = []
    covered, total = 0, 0.0

    def norm_rows(a: int, b: int) -> np.ndarray:
        return to_u8(reader.rows(a, b))

    tile_rows: dict[int, list[tiles_mod.Tile]] = {}  # the plan's rows of tiles, top to bottom
    for p in plan:
        tile_rows.setdefault(p.y, []).append(p)
    row_starts = sorted(tile_rows)

    def send(ty: int) -> Callable[[], list[tuple]]:
        t = time.perf_counter()
        row = tile_rows[ty]
        band = working_rows(norm_rows, (h, w), working, ty, ty + row[0].h)
        crops = [np.ascontiguousarray(band[:, p.x:p.x + p.w]) for p in row]
        timing["read + normalise + resample"] += time.perf_counter() - t
        return submit(crops)

    waiting = send(row_starts[0])
    for k, ty in enumerate(row_starts):
        row = tile_rows[ty]
        t = time.perf_counter()
        results = waiting()
        timing["model"] += time.perf_counter() - t  # waiting for it, beyond what overlapped
        if k + 1 < len(row_starts):
            waiting = send(row_starts[k + 1])
        t = time.perf_counter()
        for p, (lab, conf, cls) in zip(row, results):
            before = merger.n_kept
            lab = np.asarray(lab)
            if not merger.add(p, lab, conf, cls):
                continue
            # The cells just painted: whether each covers a field pixel centre (else map_back drops it), its rows.
            win = merger.window(p, *lab.shape)
            new = np.where(win > before, win - before, 0).astype(np.int64)
            n_new = merger.n_kept - before
            hit = new[sampled_rows[p.y:p.y + win.shape[0]][:, None] & sampled_cols[p.x:p.x + win.shape[1]][None, :]]
            present = np.bincount(hit, minlength=n_new + 1)[1:] > 0
            boxes = ndimage.find_objects(new, max_label=n_new)
            top_w = np.array([p.y + b[0].start for b in boxes], np.int64)
            bottom_w = np.array([p.y + b[0].stop - 1 for b in boxes], np.int64)
            cells.add(present, np.searchsorted(field_rows_of, top_w), bottom_w)
        out.peak_rows["working labels"] = max(out.peak_rows["working labels"], merger.labels.shape[0])
        timing["merge"] += time.perf_counter() - t

        # Working rows no later tile reaches, onto the field's rows; then what that completes.
        t = time.perf_counter()
        upto = row_starts[k + 1] if k + 1 < len(row_starts) else working[0]
        now = int(np.searchsorted(field_rows_of, upto))  # field rows whose working row is final
        if now > done:
            src = field_rows_of[done:now] - merger.top
            new_lab = cells.final[merger.labels[src][:, field_cols_of]].astype(np.uint32)
            raw = reader.rows(done, now)
            lab_rows = np.concatenate([lab_rows, new_lab])
            raw_rows = np.concatenate([raw_rows, raw])
            img_rows = np.concatenate([img_rows, to_u8(raw)])
            covered += int(np.count_nonzero(new_lab))
            total += float(raw.sum(dtype=np.float64))
            done = now
        merger.drop(upto)
        conf, cls = merger.scores()
        keep = cells.final[1:] > 0
        conf, cls = conf[keep], cls[keep]
        ready = np.flatnonzero(~cells.measured & (cells.bottom_w < upto)) + 1  # final labels, ascending
        if len(ready):
            c0 = int(cells.top[ready - 1].min())
            crop = lab_rows[c0 - held:]
            relabel = np.zeros(cells.n + 1, np.uint32)
            relabel[ready] = np.arange(1, len(ready) + 1, dtype=np.uint32)
            part = measure_cells(relabel[crop], raw_rows[c0 - held:], cls[ready - 1], conf[ready - 1], pixel_size,
                                 row_offset=c0)
            part["label"] = ready.astype(np.uint32)
            measured.append(part)
            cells.measured[ready - 1] = True
        while written < h and (done >= min(h, written + CHUNK)):
            end = min(h, written + CHUNK)
            write_rows(written, raw_rows[written - held:end - held], lab_rows[written - held:end - held],
                       img_rows[written - held:end - held])
            written = end
        out.peak_rows["field rows"] = max(out.peak_rows["field rows"], lab_rows.shape[0])
        pending = np.flatnonzero(~cells.measured)
        keep_from = min([written, *cells.top[pending].tolist()]) if len(pending) else written
        if keep_from > held:
            lab_rows, raw_rows, img_rows = (a[keep_from - held:] for a in (lab_rows, raw_rows, img_rows))
            held = keep_from
        timing["map back + measure + write"] += time.perf_counter() - t
    if done < h or written < h or not cells.measured.all():
        raise RuntimeError(f"{reader.url}: streamed to row {done} of {h}; {int((~cells.measured).sum())} cells "
                           f"unmeasured")  # a plan that leaves rows: never, but never silently
    if measured:
        allcols = {c: np.concatenate([m[c] for m in measured]) for c in measured[0]}
        order = np.argsort(allcols["label"], kind="stable")
        out.cells = {c: v[order] for c, v in allcols.items()}
    else:
        out.cells = measure_cells(np.zeros((1, 1), np.uint32), np.zeros((1, 1)), np.zeros(0), np.zeros(0), pixel_size)
    out.stats = {"n_cells": cells.n, "confluence": covered / (h * w), "mean_intensity": total / (h * w),
                 "height": h, "width": w}
    out.seconds = {**timing, "all": time.perf_counter() - t0}
    return out
