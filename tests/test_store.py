"""The Zarr side of OUT: plate metadata created in one go, completed on reruns, never rewritten over data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from livecell_ray import store
from livecell_ray.plate import manifest

from .conftest import EXAMPLES

A172 = EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif"


def _plate(tmp_path, names):
    d = tmp_path / "plate"
    d.mkdir(exist_ok=True)
    for n in names:
        shutil.copy(A172, d / n)
    return manifest.scan(str(d)).fields


def _ome(path):
    return json.loads((path / "zarr.json").read_text())["attributes"]["ome"]


def test_init_plates_adds_sites_and_wells_and_keeps_written_masks(tmp_path):
    out = store.Outputs(str(tmp_path / "out"))
    first = _plate(tmp_path, ["A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_A7_1_00d04h00m_1.tif"])
    store.init_plates(out, first, 0.5, {"run": 1})
    root = tmp_path / "out" / "masks" / "A172.zarr"
    assert [i["path"] for i in _ome(root / "A" / "7")["well"]["images"]] == ["0"]
    assert _ome(root / "A" / "7" / "0" / "labels")["labels"] == ["cells"]
    assert _ome(root / "A" / "7" / "0" / "labels" / "cells")["image-label"]["source"]["image"] == "../../"
    assert _ome(root / "A" / "7" / "0")["multiscales"][0]["datasets"][0]["coordinateTransformations"][0][
        "scale"] == [4.0, 0.5, 0.5]  # timepoints 0 and 4 h: 4 h per t index
    labels = np.arange(520 * 704, dtype=np.uint32).reshape(520, 704) % 7
    image = np.full((520, 704), 9, np.uint8)
    store.write_masks(out, "A172", "A", 7, "0", 1, 2, image, labels)

    # A second field in the same well and a new well: the well's image list grows, the data stays.
    more = _plate(tmp_path, ["A172_Phase_A7_2_00d00h00m_1.tif", "A172_Phase_B1_1_00d00h00m_1.tif"])
    store.init_plates(out, more, 0.5, {"run": 2})
    assert [i["path"] for i in _ome(root / "A" / "7")["well"]["images"]] == ["0", "1"]
    assert (root / "A" / "7" / "1" / "labels" / "cells" / "zarr.json").exists()
    assert sorted(w["path"] for w in _ome(root)["plate"]["wells"]) == ["A/7", "B/1"]
    np.testing.assert_array_equal(store.read_labels(out, "A172", "A/7/0", 1), labels)
    np.testing.assert_array_equal(store.read_image(out, "A172", "A/7/0", 1), image)

    # A rerun over the same manifest finds everything in place and writes no group again.
    groups = [p for p in root.rglob("zarr.json")
              if p != root / "zarr.json" and json.loads(p.read_text())["node_type"] == "group"]
    stamps = {p: p.stat().st_mtime_ns for p in groups}
    assert len(stamps) == 2 + 2 + 3 * 3  # rows A and B, wells A/7 and B/1, three groups per image
    store.init_plates(out, more, 0.5, {"run": 3})
    assert stamps and stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_a_field_of_another_size_in_the_same_series_is_refused(tmp_path):
    out = store.Outputs(str(tmp_path / "out"))
    store.init_plates(out, _plate(tmp_path, ["A172_Phase_A7_1_00d00h00m_1.tif"]), None, {})
    store.write_masks(out, "A172", "A", 7, "0", 0, 2, np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint32))
    with pytest.raises(ValueError, match=r"8x9 px, but its field \(array A/7/0/0\) is 8x8 px at another timepoint"):
        store.write_masks(out, "A172", "A", 7, "0", 1, 2, np.zeros((9, 8), np.uint8), np.zeros((9, 8), np.uint32))


def test_arrays_are_zarr_s_own_one_chunk_per_timepoint_and_survive_racing_writers(tmp_path):
    """write_masks writes each array's zarr.json from zarr's own metadata; writers of one series' timepoints
    race to create it, in threads here, and every timepoint lands in its own chunk."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    out = store.Outputs(str(tmp_path / "out"))
    store.init_plates(out, _plate(tmp_path, ["A172_Phase_A7_1_00d00h00m_1.tif"]), None, {})
    planes = [np.full((20, 30), t + 1, np.uint32) for t in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda t: store.write_masks(out, "A172", "A", 7, "0", t, 6, planes[t].astype(np.uint8),
                                                  planes[t]), range(6)))
    root = tmp_path / "out" / "masks" / "A172.zarr"
    for path, dtype in (("A/7/0/0", np.uint8), ("A/7/0/labels/cells/0", np.uint32)):
        arr = zarr.open_array(zarr.storage.LocalStore(root), path=path, mode="r")
        assert arr.shape == (6, 20, 30) and arr.chunks == (1, 20, 30) and arr.dtype == dtype
        assert arr.metadata.dimension_names == ("t", "y", "x") and arr.fill_value == 0
        assert [c.to_dict() for c in arr.compressors] == [{"name": "zstd",
                                                             "configuration": {"level": 1, "checksum": False}}]
        np.testing.assert_array_equal(arr[:], np.stack(planes).astype(dtype))
        assert sorted(p.relative_to(root / path).as_posix() for p in (root / path / "c").rglob("*")
                      if p.is_file()) == [f"c/{t}/0/0" for t in range(6)]
    assert not list(root.rglob("*.tmp"))


def test_arrays_made_elsewhere_are_written_through_zarr_and_any_byte_order_is_stored_little_endian(tmp_path):
    """Chunks are encoded directly only for arrays laid out as ours; one made by another tool (other codecs)
    is written through zarr, so what is read back is the field either way."""
    import zarr
    from zarr.codecs import GzipCodec

    out = store.Outputs(str(tmp_path / "out"))
    store.init_plates(out, _plate(tmp_path, ["A172_Phase_A7_1_00d00h00m_1.tif"]), None, {})
    root = zarr.storage.LocalStore(tmp_path / "out" / "masks" / "A172.zarr")
    zarr.create_array(root, name="A/7/0/labels/cells/0", shape=(2, 6, 5), chunks=(1, 3, 5), dtype=np.uint32,
                      fill_value=0, compressors=GzipCodec(level=5))
    labels = np.arange(30, dtype=">u4").reshape(6, 5)  # big-endian input
    image = np.arange(30, dtype=np.uint8).reshape(6, 5)
    store.write_masks(out, "A172", "A", 7, "0", 1, 2, image, labels)
    theirs = zarr.open_array(root, path="A/7/0/labels/cells/0", mode="r")
    assert [c.to_dict()["name"] for c in theirs.compressors] == ["gzip"]  # left as it was made
    np.testing.assert_array_equal(theirs[1], labels)
    ours = zarr.open_array(root, path="A/7/0/0", mode="r")
    np.testing.assert_array_equal(ours[1], image)
    assert not ours[0].any()  # the other timepoint is still the fill value


def test_plate_metadata_cut_short_while_growing_is_completed_by_the_retry(tmp_path, monkeypatch):
    """The plate's layout is recorded last: if growing the time axis fails part-way, the retry (store.retry
    or the next run) still sees the old layout and grows every array."""
    out = store.Outputs(str(tmp_path / "out"))
    first = _plate(tmp_path, ["A172_Phase_A7_1_00d00h00m_1.tif"])
    store.init_plates(out, first, None, {})
    store.write_masks(out, "A172", "A", 7, "0", 0, 1, np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint32))
    grown = _plate(tmp_path, ["A172_Phase_A7_1_00d04h00m_1.tif"])
    fields, layouts = manifest.apply_layout(grown, store.read_layouts(out, ["A172"]))
    assert layouts["A172"]["timepoints"] == [0.0, 4.0]
    real, calls = store._ngff._grow_time_axis, []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError("connection reset")
        return real(*args, **kwargs)

    monkeypatch.setattr(store._ngff, "_grow_time_axis", flaky)
    with pytest.raises(OSError):
        store.init_plates(out, fields, None, {}, layouts)
    store.init_plates(out, fields, None, {}, layouts)
    assert len(calls) == 2
    import zarr

    arr = zarr.open_array(zarr.storage.LocalStore(tmp_path / "out" / "masks" / "A172.zarr"),
                          path="A/7/0/labels/cells/0", mode="r")
    assert arr.shape == (2, 8, 8) and arr[0].min() == 1 and arr[1].max() == 0
    assert store.read_layouts(out, ["A172"])["A172"] == layouts["A172"]


def test_ngff_time_axis_states_hours_while_timepoints_are_evenly_spaced(tmp_path):
    """t is in hours (scale: the interval; translation: the first hour) while the plate's timepoints are
    evenly spaced in t order; a timepoint that arrives after later ones turns every group's t into an
    index (no unit), and the plate layout keeps each index's hour."""
    out = store.Outputs(str(tmp_path / "out"))
    root = tmp_path / "out" / "masks" / "A172.zarr"

    def run(names):
        fields = _plate(tmp_path, names)
        fields, layouts = manifest.apply_layout(fields, store.read_layouts(out, fields["plate"].unique()))
        store.init_plates(out, fields, 0.5, {}, layouts)

    def t_axis(group):
        ms = _ome(group)["multiscales"][0]
        return ms["axes"][0], ms["datasets"][0]["coordinateTransformations"]

    run(["A172_Phase_A7_1_01d00h00m_1.tif"])  # one timepoint, at 24 h
    assert t_axis(root / "A" / "7" / "0") == ({"name": "t", "type": "time", "unit": "hour"},
                                              [{"type": "scale", "scale": [1.0, 0.5, 0.5]},
                                               {"type": "translation", "translation": [24.0, 0.0, 0.0]}])
    run(["A172_Phase_A7_1_01d06h00m_1.tif", "A172_Phase_A7_2_01d06h00m_1.tif"])  # + 30 h, and a new site
    for g in ("A/7/0", "A/7/0/labels/cells", "A/7/1", "A/7/1/labels/cells"):  # old groups rewritten, new ones
        assert t_axis(root / g)[1][0]["scale"] == [6.0, 0.5, 0.5]
        assert t_axis(root / g)[1][1]["translation"] == [24.0, 0.0, 0.0]
    groups = list(root.rglob("zarr.json"))
    stamps = {p: p.stat().st_mtime_ns for p in groups if json.loads(p.read_text())["node_type"] == "group"}
    run(["A172_Phase_A7_1_01d12h00m_1.tif"])  # 36 h: the same interval, no group is rewritten
    assert t_axis(root / "A" / "7" / "0")[1][0]["scale"] == [6.0, 0.5, 0.5]
    assert all(p.stat().st_mtime_ns == m for p, m in stamps.items() if p.parent.name != "A172.zarr")
    run(["A172_Phase_A7_1_01d03h00m_1.tif"])  # 27 h arrives last: t index 3 is 27 h, so t is an index now
    for g in ("A/7/0", "A/7/1/labels/cells"):
        assert t_axis(root / g) == ({"name": "t", "type": "time"}, [{"type": "scale", "scale": [1.0, 0.5, 0.5]}])
    assert _ome(root)  # still a plate
    assert json.loads((root / "zarr.json").read_text())["attributes"][store.LAYOUT_KEY]["timepoints"] == [
        24.0, 30.0, 36.0, 27.0]


def test_group_documents_are_zarr_s_own_bytes_and_folders_made_ahead_take_the_writes(tmp_path):
    """init_plates writes group documents itself (not through zarr's event loop): byte for byte what
    zarr writes, so zarr opens every group; make_folders' empty folders hold nothing zarr or a table
    reader would see, and a field written after lands in them."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata

    attrs = {"ome": {"version": "0.5", "labels": ["cells"], "x": [1.5, None, "é"]}}
    want = GroupMetadata(attributes=attrs).to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    assert store.group_document(attrs) == want
    out = store.Outputs(str(tmp_path / "out"))
    fields = _plate(tmp_path, ["A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_B1_2_00d04h00m_1.tif"])
    assert store.make_folders(out, fields) == 2 * 2 + 2 * 2  # two arrays a field, two tables a well
    store.init_plates(out, fields, None, {})
    root = zarr.open_group(out.zarr_store("A172"), mode="r", zarr_format=3)
    for image in ("A/7/0", "B/1/0"):
        assert root[image].attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
        assert root[f"{image}/labels/cells"].attrs["ome"]["image-label"]["source"]["image"] == "../../"
    assert out.read_table("fields").empty and out.done_field_ids() == set()
    labels = np.arange(520 * 704, dtype=np.uint32).reshape(520, 704) % 5
    store.write_masks(out, "A172", "B", 1, "0", 1, 2, np.zeros((520, 704), np.uint8), labels)
    np.testing.assert_array_equal(store.read_labels(out, "A172", "B/1/0", 1), labels)
