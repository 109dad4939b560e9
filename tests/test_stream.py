"""Fields too large to hold whole, streamed a tile row at a time (livecell_ray.pipeline.stream): the same cells,
measurements and arrays as the whole-field path, in bounded memory, through the pipeline and its store."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.dataset as ds
import pytest
import tifffile
import zarr
from scipy import ndimage

from livecell_ray import pipeline, store
from livecell_ray.config import SegmentConfig
from livecell_ray.measure import measure_cells, measure_field
from livecell_ray.model import models, tiles
from livecell_ray.model.segment import Segmenter
from livecell_ray.pipeline import stream
from livecell_ray.plate.imaging import ImageError, normalize

from .test_plates import SPARSE, _best_iou, _field


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter({models.DEFAULT_KEY: models.resolve("small")})


def _mosaic16() -> np.ndarray:
    """Four real LIVECell fields stitched 2x2 (1040 x 1408), as 16-bit camera values."""
    ims = [_field(n).astype(np.uint16) * 257 + 40 for n in SPARSE]
    return np.block([[ims[0], ims[1]], [ims[2], ims[3]]])


def _stream(reader, tile_fn, working, plan, px):
    """segment_streamed with a local model; the chunk rows it writes (the raw image, labels, the uint8 image),
    assembled."""
    rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def write(y, image, labels, uint8):
        assert y not in rows and y % stream.CHUNK == 0
        rows[y] = (image.copy(), labels.copy(), uint8.copy())

    res = stream.segment_streamed(reader, lambda t: (lambda r=tile_fn(t): r), working, plan, px, write,
                                  stream.normaliser(reader))
    image, labels, uint8 = (np.concatenate([rows[y][k] for y in sorted(rows)]) for k in range(3))
    return res, image, labels, uint8


def _model_tiles(seg, key):
    return lambda crops: [(r.labels, r.confidences, r.class_ids) for r in seg.tile_batch(key, crops)]


def test_a_streamed_field_is_the_whole_field_label_for_label_at_the_models_scale(segmenter, tmp_path, monkeypatch):
    """At the model's own pixel size, a field streamed a tile row at a time gives the whole-field path's label
    image, every cell's every measurement, the field's statistics and its normalised image, exactly; in
    chunk rows of CHUNK (256 here, so that many are written and dropped)."""
    monkeypatch.setattr(stream, "CHUNK", 256)
    raw = _mosaic16()
    tifffile.imwrite(tmp_path / "m.tif", raw)
    px = models.resolve("small").working_pixel_size
    whole = segmenter([normalize(raw)], ["x"], [px])[0]
    want = measure_cells(whole.labels, raw, whole.class_ids, whole.confidences, px)
    reader = stream.RowReader(str(tmp_path / "m.tif"))
    assert reader._offset is not None  # read by seeking to its rows
    key, scale, working, plan = segmenter.tiling("x", px, reader.shape)
    assert scale == 1.0 and working == raw.shape and len({t.y for t in plan}) >= 2
    res, image, labels, uint8 = _stream(reader, _model_tiles(segmenter, key), working, plan, px)
    assert whole.labels.max() > 500
    np.testing.assert_array_equal(labels, whole.labels)
    np.testing.assert_array_equal(image, raw)  # the instrument's values go to the Zarr image
    np.testing.assert_array_equal(uint8, normalize(raw))  # the model's plane, for arrays of format 0.2
    assert set(res.cells) == set(want)
    for c in want:
        np.testing.assert_array_equal(res.cells[c], want[c], err_msg=c)
    stats = measure_field(whole.labels, raw)
    for k in ("n_cells", "confluence", "height", "width"):
        assert res.stats[k] == stats[k], k
    assert res.stats["mean_intensity"] == pytest.approx(stats["mean_intensity"], rel=1e-12)


def test_a_streamed_field_resampled_to_the_models_scale_finds_the_same_cells(segmenter, tmp_path):
    """At LIVECell's pixel size (small.pt enlarges it 1.18x) each tile row's band is resampled on its own:
    the same cells as resampling the field whole, within 1% in number and 97% matched at IoU >= 0.5."""
    raw = _mosaic16()
    tifffile.imwrite(tmp_path / "m.tif", raw, compression="zlib", rowsperstrip=64)
    reader = stream.RowReader(str(tmp_path / "m.tif"))
    assert reader._offset is None and reader._array is not None  # strips, decoded as the rows need them
    whole = segmenter([normalize(raw)], ["x"], [1.24])[0].labels
    key, scale, working, plan = segmenter.tiling("x", 1.24, reader.shape)
    assert scale == pytest.approx(1.24 / models.resolve("small").working_pixel_size)
    _, _, labels, _ = _stream(reader, _model_tiles(segmenter, key), working, plan, 1.24)
    n, m = int(whole.max()), int(labels.max())
    assert n > 500 and abs(n - m) <= 0.01 * n, (n, m)
    assert (_best_iou(whole.astype(np.int64), labels.astype(np.int64))[1:] >= 0.5).mean() >= 0.97


def _threshold_model(crops):
    """A stand-in network for the bounded-memory test (deterministic): bright blobs, one cell each, and
    one-pixel 'cells' on a grid of the background (at the working scale; enlarged, many lie between the
    field's pixel centres, so mapping back drops them)."""
    out = []
    for c in crops:
        lab, n = ndimage.label(c > 127)
        yy, xx = np.mgrid[:c.shape[0], :c.shape[1]]
        dots = (yy % 7 == 3) & (xx % 11 == 5) & (c < 50) & (lab == 0)
        lab[dots] = n + np.arange(1, int(dots.sum()) + 1)
        n += int(dots.sum())
        out.append((lab.astype(np.uint16), np.linspace(0.3, 0.9, n).astype(np.float32), np.zeros(n, np.int16)))
    return out


@pytest.mark.parametrize("field_px", [1.0, 1.6, 0.7])
def test_a_tall_field_streams_in_a_few_tile_rows_with_the_whole_fields_cells(tmp_path, monkeypatch, field_px):
    """A field 40 tiles tall: the buffers hold a few tile rows and a chunk row however tall it is, and the
    cells (painted across tile seams, mapped back to the field's pixels, some too small to reach a field
    pixel when enlarged) are those of merging the same tiles' answers for the whole field at once."""
    monkeypatch.setattr(stream, "CHUNK", 128)
    rng = np.random.default_rng(3)
    h, w = 5000, 300
    raw = np.full((h, w), 1000, np.uint16)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(1500):
        y, x, r = rng.integers(0, h), rng.integers(0, w), rng.uniform(0.4, 9)
        raw[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 3000
    tifffile.imwrite(tmp_path / "tall.tif", raw)
    reader = stream.RowReader(str(tmp_path / "tall.tif"))
    scale = field_px  # working px per field px
    working = tiles.resampled_shape((h, w), scale)
    plan = tiles.plan(working, 128, 32)
    res, image, labels, uint8 = _stream(reader, _threshold_model, working, plan, None)
    # The whole-field reference: the same working image (stream.working_rows over all of it), every tile's
    # answer merged at once, mapped back whole, measured whole.
    to_u8 = stream.normaliser(reader)
    m = stream.working_rows(lambda a, b: to_u8(raw[a:b]), (h, w), working, 0, working[0])
    lab, conf, cls = tiles.merge_stream(working, plan, _threshold_model([m[t.y:t.y + t.h, t.x:t.x + t.w]
                                                                          for t in plan]))
    lab, conf, cls = tiles.map_back(lab, conf, cls, (h, w))
    want = measure_cells(lab, raw, cls, conf)
    assert lab.max() > 1000
    np.testing.assert_array_equal(labels, lab)
    np.testing.assert_array_equal(image, raw)
    np.testing.assert_array_equal(uint8, normalize(raw))
    for c in want:
        np.testing.assert_array_equal(res.cells[c], want[c], err_msg=c)
    assert res.peak_rows["working labels"] <= 2 * 128
    assert res.peak_rows["field rows"] <= 128 + 2 * 128 / scale + 20  # a chunk row, a tile row or two
    if scale > 1:  # blobs under a pixel were found at the working scale and dropped mapping back
        assert tiles.merge_stream(working, plan, _threshold_model([m[t.y:t.y + t.h, t.x:t.x + t.w]
                                                                  for t in plan]))[0].max() > lab.max()


def test_working_rows_resample_a_band_as_the_whole_field_is_resampled():
    """A band of rows at the model's scale, from just the field rows it lies on: within one grey level of
    resampling the field whole (cv2, as tiles.resample does), enlarged or reduced."""
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.uniform(0, 255, (300, 200)), 3).astype(np.uint8)
    for scale in (1.18, 0.55):
        whole = tiles.resample(field, scale)
        band = stream.working_rows(lambda a, b: field[a:b], field.shape, whole.shape, 40, 140)
        diff = np.abs(band.astype(int) - whole[40:140].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.5, (scale, diff.max(), diff.mean())


def test_row_reader_reads_rows_of_any_tiff_layout_and_store(tmp_path):
    """Rows of a contiguous, a striped-compressed and a tiled TIFF, on disk and in memory://; a multi-channel
    file is read whole and its channel chosen as for any field, or refused naming the file."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4096, (700, 333)).astype(np.uint16)
    fs = fsspec.filesystem("memory")
    for name, kw in (("flat", {}), ("strips", {"compression": "zlib", "rowsperstrip": 50}),
                     ("tiles", {"compression": "zlib", "tile": (128, 128)}), ("big", {"byteorder": ">"})):
        tifffile.imwrite(tmp_path / f"{name}.tif", a, **kw)
        fs.pipe(f"/stream-test/{name}.tif", (tmp_path / f"{name}.tif").read_bytes())
        for url in (str(tmp_path / f"{name}.tif"), f"memory://stream-test/{name}.tif"):
            r = stream.RowReader(url)
            assert r.shape == a.shape and r.dtype == np.uint16
            np.testing.assert_array_equal(r.rows(123, 456), a[123:456])
            np.testing.assert_array_equal(r.rows(650, 900), a[650:])
            r.close()
    tifffile.imwrite(tmp_path / "channels.tif", np.stack([a, a // 2]), metadata={"axes": "CYX"})
    from livecell_ray.plate.imaging import Planes

    np.testing.assert_array_equal(stream.RowReader(str(tmp_path / "channels.tif"), planes=Planes("1")).rows(0, 9),
                                  a[:9] // 2)
    with pytest.raises(ImageError, match="channels.tif"):
        stream.RowReader(str(tmp_path / "channels.tif"))
    (tmp_path / "cut.tif").write_bytes((tmp_path / "flat.tif").read_bytes()[:200_000])
    with pytest.raises(ImageError, match="cut.tif: truncated"):
        stream.RowReader(str(tmp_path / "cut.tif")).rows(0, 700)


def test_the_pipeline_streams_a_large_file_to_the_outputs_of_reading_it_whole(ray_local, tmp_path):
    """A plate holding a stitched frame, an ordinary field and a truncated frame: with stream_mb below the
    frames' size they are streamed, and the outputs (labels, images, cells, fields) are those of reading
    them whole; the streamed arrays are chunked 1024 x 1024; the truncated file fails naming itself while
    the rest completes; a rerun resumes without duplicates."""
    plate = tmp_path / "plate"
    plate.mkdir()
    raw = _mosaic16()
    tifffile.imwrite(plate / "Mosaic_Phase_A1_1_00d00h00m_1.tif", raw)
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "livecell_plate" / f"{SPARSE[1]}.tif", plate)
    data = (plate / "Mosaic_Phase_A1_1_00d00h00m_1.tif").read_bytes()
    (plate / "Mosaic_Phase_B1_1_00d00h00m_1.tif").write_bytes(data[:len(data) // 2])
    px = models.resolve("small").working_pixel_size
    outs = {}
    for name, mb in (("streamed", 1.0), ("whole", None)):
        out = tmp_path / name
        s = pipeline.run(SegmentConfig(source=str(plate), out=str(out), pixel_size=px, stream_mb=mb, compact=False))
        assert s.fields_done == 2 and s.fields_failed == 1, s.failures
        assert "Mosaic_Phase_B1" in s.failures[0]["error"]
        if name == "streamed":
            assert "truncated" in s.failures[0]["error"]
        outs[name] = out
    tables = {}
    for name, out in outs.items():
        for t, keys in (("cells", ["field_id", "label"]), ("fields", ["field_id"])):
            tables[name, t] = (ds.dataset(str(out / t), partitioning="hive").to_table().to_pandas()
                               .sort_values(keys).reset_index(drop=True))
    assert len(tables["streamed", "cells"]) > 500
    for t in ("cells", "fields"):
        a, b = tables["streamed", t], tables["whole", t]
        assert list(a.columns) == list(b.columns)
        for c in a.columns:
            if c != "mean_intensity" or t == "cells":
                assert a[c].equals(b[c]), (t, c)
            else:
                np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), rtol=1e-12)
    for _, f in tables["streamed", "fields"].iterrows():
        inner = f["zarr_path"].split(".zarr/")[1]
        got = [store.read_labels(store.Outputs(str(outs[n])), f["plate"], inner, 0) for n in outs]
        np.testing.assert_array_equal(*got)
        imgs = [store.read_image(store.Outputs(str(outs[n])), f["plate"], inner, 0) for n in outs]
        np.testing.assert_array_equal(*imgs)
    chunks = zarr.open_array(str(outs["streamed"] / "masks" / "Mosaic.zarr" / "A" / "1" / "0" / "labels" / "cells"
                                 / "0"), mode="r").chunks
    assert chunks == (1, 1024, 1024)
    again = pipeline.run(SegmentConfig(source=str(plate), out=str(outs["streamed"]), pixel_size=px, stream_mb=1.0,
                                       compact=False))
    assert again.fields_skipped == 2 and again.fields_done == 0
    cells = ds.dataset(str(outs["streamed"] / "cells"), partitioning="hive").to_table()
    assert cells.num_rows == len(tables["streamed", "cells"])


def test_stream_mb_must_be_positive():
    with pytest.raises(ValueError, match="stream_mb"):
        SegmentConfig(source="a", out="b", stream_mb=0)
