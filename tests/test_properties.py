"""Property-based tests (hypothesis): file-name parsing and label-image construction."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livecell_ray.model import labels as L
from livecell_ray.plate import manifest as m

cell_types = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,7}", fullmatch=True)
rows = st.sampled_from(list("ABCDEFGHIJKLMNOP"))


@given(ct=cell_types, row=rows, col=st.integers(1, 24), field=st.integers(1, 99), day=st.integers(0, 99),
       hour=st.integers(0, 23), minute=st.integers(0, 59), crop=st.integers(1, 9),
       ext=st.sampled_from(["tif", "tiff", "png", "jpg"]))
def test_livecell_names_round_trip(ct, row, col, field, day, hour, minute, crop, ext):
    name = f"{ct}_Phase_{row}{col}_{field}_{day:02d}d{hour:02d}h{minute:02d}m_{crop}.{ext}"
    meta = m.parse_name(name)
    assert meta is not None
    assert (meta["cell_type"], meta["plate"], meta["row"], meta["column"]) == (ct, ct, row, col)
    assert meta["well"] == f"{row}{col}" and meta["field"] == str(field) and meta["crop"] == crop
    assert abs(meta["timepoint"] - (day * 24 + hour + minute / 60)) < 1e-3


@given(st.text(max_size=60))
def test_random_names_never_crash(name):
    meta = m.parse_name(name)
    assert meta is None or meta["well"] == f"{meta['row']}{meta['column']}"


@given(ct=cell_types, row=rows, col=st.integers(1, 24), junk=st.sampled_from(["", "_x", ".bak", "Phase"]))
def test_names_missing_parts_do_not_parse(ct, row, col, junk):
    assert m.parse_name(f"{ct}_Phase_{row}{col}{junk}.tif") is None


@given(keys=st.lists(st.tuples(cell_types, rows, st.integers(1, 24), st.integers(1, 9), st.integers(0, 96)),
                     min_size=1, max_size=20, unique=True))
def test_field_ids_are_unique_and_stable(keys):
    ids = [m.field_id(ct, f"{r}{c}", str(f), 1, float(t)) for ct, r, c, f, t in keys]
    assert len(set(ids)) == len(ids)
    assert ids == [m.field_id(ct, f"{r}{c}", str(f), 1, float(t)) for ct, r, c, f, t in keys]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 60), h=st.integers(24, 160), w=st.integers(24, 160))
def test_label_image_construction(seed, n, h, w):
    rng = np.random.default_rng(seed)
    mh, mw = 32, 40
    protos = rng.normal(size=(8, mh, mw)).astype(np.float32) * 3
    coeffs = rng.normal(size=(n, 8)).astype(np.float32)
    xy = rng.uniform(-10, [w + 10, h + 10], size=(n, 2))
    wh = rng.uniform(1, 50, size=(n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
    conf = rng.uniform(0, 1, size=n).astype(np.float32)
    ax = L.axis_weights((mh, mw), (h, w))
    lab, kept = L.paint(protos, coeffs, boxes, conf, (h, w), ax)
    present = np.unique(lab)
    present = present[present > 0]
    # Every label is unique to one instance, has pixels, and labels run 1..K without gaps.
    assert np.array_equal(present, np.arange(1, len(kept) + 1))
    assert len(set(kept.tolist())) == len(kept)
    # Label order is confidence order.
    assert np.all(np.diff(conf[kept]) <= 0)
    # Each label lies inside its instance's box.
    for k, i in enumerate(kept, start=1):
        ys, xs = np.nonzero(lab == k)
        x0, y0, x1, y1 = boxes[i]
        assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1)
        assert ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
