"""Real plates in: pixel scale, fields larger than the model, channel and stack TIFFs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from livecell_ray import pipeline, store
from livecell_ray.config import SegmentConfig
from livecell_ray.model import models, tiles
from livecell_ray.model.segment import Segmenter
from livecell_ray.plate.imaging import normalize, read_image

from .conftest import EXAMPLES

CLI = [sys.executable, "-m", "livecell_ray.cli"]
SPARSE = ["A172_Phase_A7_1_00d00h00m_1", "BT474_Phase_A3_2_01d12h00m_2", "SKOV3_Phase_G4_1_00d12h00m_2",
          "SkBr3_Phase_E3_2_02d08h00m_1"]


def _field(name: str) -> np.ndarray:
    return read_image(str(EXAMPLES / f"{name}.tif"))


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter({models.DEFAULT_KEY: models.resolve("small")})


def _best_iou(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each label of ref (index = label), the best IoU with any label of other."""
    g, p = ref.ravel().astype(np.int64), other.ravel().astype(np.int64)
    ng, npd = int(g.max()), int(p.max())
    gs, ps = np.bincount(g, minlength=ng + 1), np.bincount(p, minlength=npd + 1)
    both = (g > 0) & (p > 0)
    inter = np.bincount(g[both] * (npd + 1) + p[both], minlength=(ng + 1) * (npd + 1)).reshape(ng + 1, npd + 1)
    j = inter.argmax(1)
    best = inter[np.arange(ng + 1), j] / np.maximum(1, gs + ps[j] - inter[np.arange(ng + 1), j])
    best[0] = 0
    return best


def _border_labels(lab: np.ndarray) -> set[int]:
    return set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())


# --------------------------------------------------------------------------- tiles
def test_tiles_cover_the_field_and_cores_partition_it():
    for shape in [(1040, 1408), (520, 704), (10_000, 7_001), (700, 3000)]:
        plan = tiles.plan(shape, 704, 176)
        cover = np.zeros(shape, np.int32)
        core = np.zeros(shape, np.int32)
        for t in plan:
            cover[t.y:t.y + t.h, t.x:t.x + t.w] += 1
            core[t.core_y[0]:t.core_y[1], t.core_x[0]:t.core_x[1]] += 1
            assert t.y <= t.core_y[0] and t.core_y[1] <= t.y + t.h and t.x <= t.core_x[0] <= t.core_x[1] <= t.x + t.w
        assert cover.min() >= 1 and (core == 1).all(), shape
        # between neighbours, the core boundary is at least half the overlap away from either tile's edge
        for t in plan:
            for lo, hi, a, n in ((*t.core_y, t.y, t.h), (*t.core_x, t.x, t.w)):
                if lo > 0:
                    assert lo - a >= 176 // 2 - 1
                if hi < (shape[0] if n == t.h and a == t.y else shape[1]):
                    assert a + n - hi >= 176 // 2 - 1


def test_merge_keeps_each_cell_once_across_a_seam():
    """Two overlapping tiles that both see the same three cells: each cell comes out once, whole."""
    truth = np.zeros((100, 300), np.uint32)
    truth[20:40, 130:170] = 1  # straddles the seam
    truth[60:80, 10:30] = 2  # left tile only
    truth[60:80, 260:290] = 3  # right tile only
    plan = tiles.plan(truth.shape, 200, 100)
    assert [t.x for t in plan] == [0, 100]
    labs = [truth[:, t.x:t.x + t.w].copy() for t in plan]
    labs = [np.unique(lab, return_inverse=True)[1].reshape(lab.shape).astype(np.uint32) for lab in labs]
    conf = [np.linspace(0.9, 0.5, int(lab.max()), dtype=np.float32) for lab in labs]
    cls = [np.zeros(int(lab.max()), np.int16) for lab in labs]
    out, c, k = tiles.merge(truth.shape, plan, labs, conf, cls)
    assert out.max() == 3 and len(c) == 3 and len(k) == 3
    for cell in (1, 2, 3):
        assert len(np.unique(out[truth == cell])) == 1 and (out[truth == cell] > 0).all()


def _merge_cell_by_cell(shape: tuple[int, int], plan: list[tiles.Tile], labels: list[np.ndarray],
                        confidences: list[np.ndarray], class_ids: list[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tiles.merge one cell at a time, as the rule reads (tiles' module docstring)."""
    from scipy import ndimage

    out = np.zeros(shape, np.uint32)
    conf: list[float] = []
    cls: list[int] = []
    for t, lab, c, k in zip(plan, labels, confidences, class_ids):
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            if sl is None:
                continue
            mask = lab[sl] == i
            ys, xs = np.nonzero(mask)
            cy, cx = t.y + sl[0].start + ys.mean(), t.x + sl[1].start + xs.mean()
            if not (t.core_y[0] - tiles.CORE_MARGIN <= cy < t.core_y[1] + tiles.CORE_MARGIN
                    and t.core_x[0] - tiles.CORE_MARGIN <= cx < t.core_x[1] + tiles.CORE_MARGIN):
                continue
            window = out[t.y + sl[0].start:t.y + sl[0].stop, t.x + sl[1].start:t.x + sl[1].stop]
            free = window == 0
            if (~free[mask]).mean() > tiles.DUPLICATE_FRACTION:
                continue
            conf.append(float(c[i - 1]))
            cls.append(int(k[i - 1]))
            window[mask & free] = len(conf)
    return out, np.asarray(conf, np.float32), np.asarray(cls, np.int16)


@pytest.mark.parametrize("seed", range(6))
def test_merge_all_cells_of_a_tile_at_once_equals_the_rule_cell_by_cell(seed):
    """tiles.merge paints a tile's cells together; _merge_cell_by_cell applies the rule one cell at a
    time. On random fields of touching and overlapping cells, seen by every tile with its own slightly
    different masks (as two network passes see them), and with cells only one tile has, both give the same
    label image, scores and classes, to the pixel."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(300, 700)), int(rng.integers(300, 700)))
    plan = tiles.plan(shape, 256, 64)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    centres = rng.uniform(0, 1, (int(rng.integers(40, 160)), 2)) * shape
    radii = rng.uniform(3, 14, len(centres))
    labs, conf, cls = [], [], []
    for t in plan:
        lab = np.zeros((t.h, t.w), np.uint32)
        ty, tx = yy[t.y:t.y + t.h, t.x:t.x + t.w], xx[t.y:t.y + t.h, t.x:t.x + t.w]
        n = 0
        for (cy, cx), r in zip(centres + rng.normal(0, 1.0, centres.shape), radii):  # each tile its own masks
            if rng.random() < 0.1:
                continue  # a cell this tile misses
            disk = ((ty - cy) ** 2 + (tx - cx) ** 2 <= r * r) & (lab == 0)
            if disk.any():
                n += 1
                lab[disk] = n
        labs.append(lab)
        conf.append(rng.uniform(0.25, 1.0, n).astype(np.float32))
        cls.append(rng.integers(0, 8, n).astype(np.int16))
    got, want = tiles.merge(shape, plan, labs, conf, cls), _merge_cell_by_cell(shape, plan, labs, conf, cls)
    assert want[0].max() > 10
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    assert got[1].dtype == want[1].dtype and got[2].dtype == want[2].dtype


def test_a_mosaic_of_four_fields_gives_their_cells_and_splits_none_at_a_seam(segmenter):
    """Four real fields stitched 2x2 (1408x1040, a full Incucyte frame) are tiled at the model's scale:
    as many cells as the four fields alone (within 5%), the fields' inner cells found again (IoU >= 0.5),
    and no cell that crosses a tile seam comes out as two labels, one each side of it."""
    ims = [normalize(_field(n)) for n in SPARSE]
    alone = segmenter(ims)
    mosaic = np.block([[ims[0], ims[1]], [ims[2], ims[3]]])
    m = segmenter([mosaic])[0]
    n_alone = sum(int(r.labels.max()) for r in alone)
    assert abs(int(m.labels.max()) - n_alone) <= 0.05 * n_alone, (int(m.labels.max()), n_alone)
    # The tiles as the segmenter cut them: the frame at the model's working scale (small.pt: 1.18x), in
    # tiles of its input; their seams mapped back to the frame's pixels.
    scale = segmenter.scale(models.DEFAULT_KEY, segmenter.trained_at[models.DEFAULT_KEY])
    size = segmenter.imgsz[models.DEFAULT_KEY]
    at_scale = tiles.resample(mosaic, scale).shape
    plan = tiles.plan(at_scale, size, size // 4)
    assert len(plan) >= 4
    seams_x = sorted({t.core_x[1] / scale for t in plan if t.core_x[1] < at_scale[1]})
    seams_y = sorted({t.core_y[1] / scale for t in plan if t.core_y[1] < at_scale[0]})
    from scipy import ndimage

    ml = m.labels.astype(np.int64)
    centre = ndimage.center_of_mass(np.ones_like(ml), ml, np.arange(1, ml.max() + 1))
    matched = inner = crossing = 0
    for r, (y, x) in zip(alone, [(0, 0), (0, 704), (520, 0), (520, 704)]):
        lab = r.labels.astype(np.int64)
        sub = ml[y:y + 520, x:x + 704]
        best = _best_iou(lab, sub)
        edge = _border_labels(lab)
        for i in range(1, int(lab.max()) + 1):
            if i in edge:
                continue
            inner += 1
            matched += best[i] >= 0.5
            ys, xs = np.nonzero(lab == i)
            cuts = [(1, s) for s in seams_x if xs.min() + x < s <= xs.max() + x]
            cuts += [(0, s) for s in seams_y if ys.min() + y < s <= ys.max() + y]
            if not cuts:
                continue
            crossing += 1
            v = sub[ys, xs]
            counts = np.bincount(v[v > 0], minlength=1)
            pieces = np.nonzero(counts >= 0.25 * len(ys))[0]
            for axis, s in cuts:
                sides = {centre[p - 1][axis] >= s for p in pieces}
                assert len(sides) < 2, f"cell {i} of field at {(y, x)} split across the seam at {s}"
    assert crossing >= 10  # the check saw cells on the seams
    assert matched >= 0.8 * inner, (matched, inner)


# --------------------------------------------------------------------------- scale
def test_a_field_at_twice_the_resolution_gives_the_same_cells_with_its_pixel_size(tmp_path, ray_local):
    """A LIVECell field at twice the resolution (each pixel 2x2), segmented with --pixel-size 0.62 (half
    LIVECell's 1.24 um/px), is resampled to the model's scale: the same cells as the native field (IoU >=
    0.5 once mapped onto the native grid) within a few percent, with masks in the 2x field's own pixels.
    (A bilinear 2x upsample would blur the field, which the model itself notices: 484 against 522 cells.)"""
    name = "SkBr3_Phase_E3_2_02d08h00m_1"
    native = _field(name)
    big = np.repeat(np.repeat(native, 2, axis=0), 2, axis=1)
    for sub, img in (("native", native), ("twice", big)):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / f"{name}.tif", img)
    runs = {}
    for sub, px in (("native", None), ("twice", 0.62)):
        cfg = SegmentConfig(source=str(tmp_path / sub), out=str(tmp_path / f"out_{sub}"), pixel_size=px,
                            compact=False)
        s = pipeline.run(cfg)
        assert s.fields_done == 1 and s.scale_assumed == (1 if px is None else 0)
        o = store.Outputs(cfg.out)
        f = o.read_table("fields").iloc[0]
        runs[sub] = (store.read_labels(o, f.plate, f.zarr_path.split(".zarr/", 1)[1], int(f.t_index)),
                     o.read_table("cells"))
    lab_native, cells_native = runs["native"]
    lab_twice, cells_twice = runs["twice"]
    assert lab_twice.shape == big.shape  # stored in the input's own pixels
    assert abs(int(lab_twice.max()) - int(lab_native.max())) <= 0.05 * lab_native.max()
    back = lab_twice[::2, ::2]
    best = _best_iou(lab_native.astype(np.int64), back)
    assert (best[1:] >= 0.5).mean() >= 0.9, (best[1:] >= 0.5).mean()
    # areas in um^2 agree, in pixels they are four times as large
    assert np.isclose(cells_twice["area_um2"].median(), cells_native["area_px"].median() * 1.24 ** 2, rtol=0.1)
    assert np.isclose(cells_twice["area_px"].median(), 4 * cells_native["area_px"].median(), rtol=0.1)


def test_pixel_size_is_read_from_an_ome_tiff(tmp_path, ray_local):
    """The same 2x field as an OME-TIFF that records 0.62 um/px: no flag needed, nothing assumed."""
    name = "SKOV3_Phase_G4_1_00d12h00m_2"
    native = _field(name)
    big = np.repeat(np.repeat(native, 2, axis=0), 2, axis=1)
    (tmp_path / "ome").mkdir()
    tifffile.imwrite(tmp_path / "ome" / f"{name}.ome.tif", big, ome=True,
                     metadata={"PhysicalSizeX": 0.62, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.62,
                               "PhysicalSizeYUnit": "µm"})
    s = pipeline.run(SegmentConfig(source=str(tmp_path / "ome"), out=str(tmp_path / "out"), compact=False))
    assert s.fields_done == 1 and s.scale_assumed == 0
    cells = store.Outputs(str(tmp_path / "out")).read_table("cells")
    assert cells["area_um2"].notna().all()
    ref = Segmenter({models.DEFAULT_KEY: models.resolve("small")})([normalize(native)])[0]
    assert abs(len(cells) - int(ref.labels.max())) <= 0.05 * ref.labels.max()


# --------------------------------------------------------------------------- planes
def _stack_plate(tmp_path: Path, kind: str) -> tuple[Path, list[np.ndarray]]:
    """One file holding three different real fields as planes: channels (OME, named) or a time-lapse."""
    planes = [_field(n) for n in SPARSE[:3]]
    d = tmp_path / kind
    d.mkdir()
    if kind == "channels":
        tifffile.imwrite(d / "SkBr3_Phase_E3_2_02d08h00m_1.tif", np.stack(planes), ome=True,
                         metadata={"axes": "CYX", "Channel": {"Name": ["GFP", "Phase", "RFP"]}})
    elif kind == "stack":
        tifffile.imwrite(d / "SkBr3_Phase_E3_2_02d08h00m_1.tif", np.stack(planes), imagej=True,
                         metadata={"axes": "TYX"})
    else:  # a bare 3-plane TIFF, as numpy arrays are often saved: tifffile marks it RGB
        tifffile.imwrite(d / "SkBr3_Phase_E3_2_02d08h00m_1.tif", np.stack(planes))
    return d, planes


@pytest.mark.parametrize("kind", ["channels", "stack", "bare"])
def test_a_multi_plane_file_without_flags_is_refused_not_averaged(kind, tmp_path):
    src, _ = _stack_plate(tmp_path, kind)
    p = subprocess.run([*CLI, "segment", str(src), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err
    assert "SkBr3_Phase_E3_2_02d08h00m_1.tif" in err and "(3, 520, 704)" in err and "--channel" in err
    assert not (tmp_path / "out").exists()


def test_channel_by_name_and_index_picks_that_plane(tmp_path, ray_local, segmenter):
    src, planes = _stack_plate(tmp_path, "channels")
    ref = segmenter([normalize(planes[1])])[0].labels
    for i, channel in enumerate(("Phase", "1")):
        out = tmp_path / f"out{i}"
        s = pipeline.run(SegmentConfig(source=str(src), out=str(out), channel=channel, compact=False))
        assert s.fields_done == 1
        o = store.Outputs(str(out))
        f = o.read_table("fields").iloc[0]
        np.testing.assert_array_equal(store.read_labels(o, f.plate, f.zarr_path.split(".zarr/", 1)[1], 0), ref)


def test_a_time_lapse_stack_becomes_one_field_timepoint_a_plane(tmp_path, ray_local, segmenter):
    src, planes = _stack_plate(tmp_path, "stack")
    out = tmp_path / "out"
    s = pipeline.run(SegmentConfig(source=str(src), out=str(out), stack_axis="t", interval_h=4.0, compact=False))
    assert s.fields_done == 3
    o = store.Outputs(str(out))
    fields = o.read_table("fields").sort_values("t_index")
    assert list(fields["t_index"]) == [0, 1, 2]
    assert list(fields["timepoint"]) == [56.0, 60.0, 64.0]  # 02d08h00m, then every 4 h
    refs = segmenter([normalize(p) for p in planes])
    for f, ref in zip(fields.itertuples(), refs):
        lab = store.read_labels(o, f.plate, f.zarr_path.split(".zarr/", 1)[1], int(f.t_index))
        np.testing.assert_array_equal(lab, ref.labels)


def test_rgb_of_a_grey_field_is_still_read(tmp_path, ray_local, segmenter):
    grey = _field(SPARSE[0])
    (tmp_path / "rgb").mkdir()
    tifffile.imwrite(tmp_path / "rgb" / f"{SPARSE[0]}.tif", np.stack([grey] * 3, axis=-1), photometric="rgb")
    s = pipeline.run(SegmentConfig(source=str(tmp_path / "rgb"), out=str(tmp_path / "out"), compact=False))
    assert s.fields_done == 1
    assert s.cells == int(segmenter([normalize(grey)])[0].labels.max())


@pytest.mark.parametrize("args, words", [
    (["--pixel-size", "0"], ["--pixel-size", "positive"]),
    (["--pixel-size", "-1.2"], ["--pixel-size", "positive"]),
    (["--stack-axis", "z"], ["--stack-axis", "'z'"]),
    (["--interval", "4"], ["--interval", "--stack-axis t"]),
    (["--channel", "5"], ["--channel 5", "out of range", "SkBr3_Phase_E3_2_02d08h00m_1.tif"]),
    (["--channel", "DAPI"], ["--channel DAPI", "GFP, Phase, RFP"]),
])
def test_bad_plane_and_scale_flags_are_one_clear_line_and_nothing_written(args, words, tmp_path):
    src, _ = _stack_plate(tmp_path, "channels")
    p = subprocess.run([*CLI, "segment", str(src), str(tmp_path / "out"), *args], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


def test_stack_axis_on_single_plane_files_names_the_file_and_flag(tmp_path):
    (tmp_path / "one").mkdir()
    tifffile.imwrite(tmp_path / "one" / f"{SPARSE[0]}.tif", _field(SPARSE[0]))
    p = subprocess.run([*CLI, "segment", str(tmp_path / "one"), str(tmp_path / "out"), "--stack-axis", "t",
                        "--interval", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error:"), p.stderr
    assert f"{SPARSE[0]}.tif" in p.stderr and "--stack-axis t" in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_field_smaller_than_the_input_is_padded_at_a_known_scale(segmenter, monkeypatch):
    """At its model's scale a small field is padded to the network's stride, not enlarged to the input (the
    cells keep their size); at an unknown scale it is letterboxed to the input, as before."""
    from livecell_ray.model import segment

    seen = []
    real = segment.letterbox

    def spy(images, imgsz, device, scaleup=True):
        x = real(images, imgsz, device, scaleup)
        seen.append(tuple(x.shape[2:]))
        return x

    monkeypatch.setattr(segment, "letterbox", spy)
    crop = normalize(_field(SPARSE[3]))[:400, :500]
    known = segmenter([crop], None, [1.24])[0]
    unknown = segmenter([crop])[0]
    # small.pt works at 1.0492 um/px (input 832): the crop at 1.24 is resampled 1.18x to 473x591, padded to
    # (480, 608); at an unknown scale it is letterboxed to 832 (1.66x).
    assert seen == [(480, 608), (672, 832)]
    assert known.labels.shape == unknown.labels.shape == (400, 500)


def test_small_segments_livecell_fields_enlarged_to_its_input_whether_or_not_their_scale_is_known(segmenter):
    """small.pt's default input is 832 (weights/models.json: the cross-validated input scale): a LIVECell
    field of unknown scale is letterboxed to it (enlarged 832/704), one given LIVECell's 1.24 um/px is
    resampled to the model's working 1.0492 um/px: the same network input, so the same cells. And --imgsz
    704 still runs it at the field's own scale, finding other cells."""
    from livecell_ray.config import InferenceConfig

    w = models.resolve("small")
    assert (w.pixel_size, w.imgsz) == (1.24, 832) and w.working_pixel_size == pytest.approx(1.24 * 704 / 832, 1e-3)
    assert segmenter.imgsz[models.DEFAULT_KEY] == 832
    field = normalize(_field(SPARSE[1]))
    unknown = segmenter([field])[0].labels
    known = segmenter([field], None, [1.24])[0].labels
    best = _best_iou(unknown.astype(np.int64), known.astype(np.int64))[1:]
    assert unknown.max() > 50 and abs(int(known.max()) - int(unknown.max())) <= 0.03 * unknown.max()
    assert (best >= 0.8).mean() >= 0.9, (best >= 0.8).mean()
    at_704 = Segmenter({models.DEFAULT_KEY: w}, InferenceConfig(imgsz=704))([field])[0].labels
    assert (_best_iou(unknown.astype(np.int64), at_704.astype(np.int64))[1:] >= 0.8).mean() < 0.9


def test_a_field_of_more_tiles_than_a_batch_is_merged_batch_by_batch_to_the_same_cells(segmenter):
    """A stitched field with more tiles than a network batch holds is cut, segmented and merged a batch at
    a time (its tiles' results are never all held): the same label image, scores and classes as merging
    the same tiles' results all at once."""
    from livecell_ray.config import InferenceConfig

    ims = [normalize(_field(n)) for n in SPARSE]
    mosaic = np.block([[ims[0], ims[1]], [ims[2], ims[3]]])
    small = Segmenter({models.DEFAULT_KEY: models.resolve("small")}, InferenceConfig(max_batch=2))
    calls = []
    real = small._predict_same_size

    def spy(key, images, scaleup=True):
        calls.append(len(images))
        return real(key, images, scaleup)

    small._predict_same_size = spy
    got = small([mosaic])[0]
    key = models.DEFAULT_KEY
    scale = small.scale(key, small.trained_at[key])
    m = tiles.resample(mosaic, scale)
    plan = tiles.plan(m.shape, small.imgsz[key], small.imgsz[key] // 4)
    assert len(plan) > 2 and calls == [2] * (len(plan) // 2) + [len(plan) % 2] * (len(plan) % 2)
    res = [r for a in range(0, len(plan), 2)
           for r in real(key, [np.ascontiguousarray(m[t.y:t.y + t.h, t.x:t.x + t.w]) for t in plan[a:a + 2]], False)]
    lab, conf, cls = tiles.merge(m.shape, plan, [r.labels for r in res], [r.confidences for r in res],
                                 [r.class_ids for r in res])
    lab, conf, cls = tiles.map_back(lab, conf, cls, mosaic.shape)
    assert got.labels.max() > 500
    np.testing.assert_array_equal(got.labels, lab)
    np.testing.assert_array_equal(got.confidences, conf)
    np.testing.assert_array_equal(got.class_ids, cls)


@pytest.mark.parametrize("shape,model_shape", [((700, 500), (826, 590)), ((333, 1001), (280, 845))])
def test_map_back_in_blocks_of_rows_equals_mapping_the_field_at_once(shape, model_shape, monkeypatch):
    """map_back gathers and renumbers a few rows at a time (a stitched well's index arrays would be 8 bytes
    a pixel): the same labels, scores and classes as the whole field at once, cells too small to reach a
    field pixel dropped with their scores."""
    rng = np.random.default_rng(1)
    n = 400_000  # more cells than field pixels: many vanish, so the renumbering is exercised
    labels = rng.integers(0, n, model_shape).astype(np.uint32)
    labels[labels > 0.9 * n] = 0
    conf = rng.uniform(0.25, 1, n).astype(np.float32)
    cls = rng.integers(0, 8, n).astype(np.int16)
    h, w = shape
    rows = np.minimum(((np.arange(h) + 0.5) * model_shape[0] / h).astype(np.int64), model_shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * model_shape[1] / w).astype(np.int64), model_shape[1] - 1)
    back = labels[rows[:, None], cols[None, :]]
    ids = np.unique(back[back > 0])
    want = np.searchsorted(ids, back) + 1
    want[back == 0] = 0
    monkeypatch.setattr(tiles, "MAP_BACK_BLOCK", 3 * w + 7)  # blocks of 3 rows, the last one shorter
    got, got_conf, got_cls = tiles.map_back(labels, conf, cls, shape)
    assert 1000 < len(ids) < 0.9 * n
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_conf, conf[ids - 1])
    np.testing.assert_array_equal(got_cls, cls[ids - 1])
