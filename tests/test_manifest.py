"""File-name parsing and manifests over fsspec URLs."""

from __future__ import annotations

import fsspec
import pandas as pd
import pytest

from livecell_ray.config import LIVECELL_PATTERN
from livecell_ray.plate import manifest as m

from .conftest import EXAMPLES

# (name, cell type, well, row, column, field, crop, hours) written out by hand from LIVECell's convention.
EXPECTED = [
    ("A172_Phase_A7_1_00d00h00m_1.tif", "A172", "A7", "A", 7, "1", 1, 0.0),
    ("BT474_Phase_A3_2_01d12h00m_2.tif", "BT474", "A3", "A", 3, "2", 2, 36.0),
    ("BV2_Phase_B4_2_02d16h00m_3.tif", "BV2", "B4", "B", 4, "2", 3, 64.0),
    ("Huh7_Phase_A10_1_00d12h00m_2.tif", "Huh7", "A10", "A", 10, "1", 2, 12.0),
    ("MCF7_Phase_E4_1_02d16h00m_1.tif", "MCF7", "E4", "E", 4, "1", 1, 64.0),
    ("MCF7_Phase_F4_1_01d16h00m_4.tif", "MCF7", "F4", "F", 4, "1", 4, 40.0),
    ("SHSY5Y_Phase_B10_1_01d16h00m_4.tif", "SHSY5Y", "B10", "B", 10, "1", 4, 40.0),
    ("SHSY5Y_Phase_D10_1_01d08h00m_1.tif", "SHSY5Y", "D10", "D", 10, "1", 1, 32.0),
    ("SKOV3_Phase_G4_1_00d12h00m_2.tif", "SKOV3", "G4", "G", 4, "1", 2, 12.0),
    ("SkBr3_Phase_E3_2_02d08h00m_1.tif", "SkBr3", "E3", "E", 3, "2", 1, 56.0),
]


@pytest.mark.parametrize("name,cell,well,row,col,fld,crop,hours", EXPECTED)
def test_livecell_names_parse(name, cell, well, row, col, fld, crop, hours):
    meta = m.parse_name(name)
    assert meta == {"plate": cell, "well": well, "row": row, "column": col, "field": fld, "crop": crop,
                    "timepoint": hours, "cell_type": cell}


def test_every_bundled_example_is_listed_in_expectations():
    assert sorted(p.name for p in EXAMPLES.glob("*.tif")) == sorted(e[0] for e in EXPECTED)


@pytest.mark.parametrize("name", [
    "A172_Phase_7A_1_00d00h00m_1.tif",      # well without a row letter first
    "A172_Phase_A7_1_00d00h_1.tif",         # no minutes
    "A172_Brightfield_A7_1_00d00h00m_1.tif",
    "A172_Phase_A7_x_00d00h00m_1.tif",      # non-numeric field
    "notes.tif",
    "A172_Phase_A7_1_00d00h00m.tif",        # no crop
    "A172_Phase_Q7_1_00d00h00m_1.tif",      # row Q is beyond a 384-well plate
])
def test_names_that_must_not_parse(name):
    assert m.parse_name(name, LIVECELL_PATTERN) is None


def test_minutes_and_days_become_hours():
    assert m.parse_name("X_Phase_B2_3_01d02h30m_1.png")["timepoint"] == 26.5


def test_custom_pattern_with_plate_and_timepoint():
    pat = r"(?P<plate>P\d+)_(?P<well>[A-P]\d{2})_s(?P<field>\d+)_t(?P<timepoint>[\d.]+)"
    meta = m.parse_name("P12_B03_s2_t4.5.tif", pat)
    assert (meta["plate"], meta["well"], meta["column"], meta["field"], meta["timepoint"]) == \
        ("P12", "B3", 3, "2", 4.5)


def test_scan_reports_unmatched_and_ids_are_stable(tmp_path):
    for name in ["A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_A7_1_00d04h00m_1.tif", "junk.tif", "a.txt"]:
        (tmp_path / name).write_bytes(b"x")
    man = m.scan(str(tmp_path))
    assert len(man) == 2
    assert [u.rsplit("/", 1)[-1] for u in man.unmatched] == ["junk.tif"]
    assert list(man.fields["t_index"]) == [0, 1]
    assert list(man.fields["n_timepoints"]) == [2, 2]
    again = m.scan(str(tmp_path))
    assert list(again.fields["field_id"]) == list(man.fields["field_id"])
    assert man.fields["field_id"].nunique() == 2


def test_time_axis_is_shared_by_the_plate(tmp_path):
    for name in ["A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_B7_1_00d04h00m_1.tif",
                 "A172_Phase_B7_1_00d08h00m_1.tif", "BV2_Phase_A1_1_00d02h00m_1.tif"]:
        (tmp_path / name).write_bytes(b"x")
    f = m.scan(str(tmp_path)).fields.set_index("well")
    assert f.loc["A7", "t_index"] == 0 and list(f.loc["B7", "t_index"]) == [1, 2]
    assert set(f[f["plate"] == "A172"]["n_timepoints"]) == {3}
    assert f.loc["A1", "t_index"] == 0 and f.loc["A1", "n_timepoints"] == 1


def test_layout_keeps_known_sites_and_times_and_numbers_new_ones_after_them(tmp_path):
    names = ["A172_Phase_A7_1_00d08h00m_1.tif", "A172_Phase_A7_2_00d08h00m_1.tif",
             "A172_Phase_A7_10_00d02h00m_1.tif", "A172_Phase_B1_1_00d08h00m_1.tif"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    fields = m.scan(str(tmp_path)).fields
    # On its own: sites in natural field order (10 after 2), times in order.
    alone = {(w, f): (s, t) for w, f, s, t in fields[["well", "field", "site", "t_index"]].itertuples(index=False)}
    assert alone[("A7", "1")] == ("0", 1) and alone[("A7", "2")] == ("1", 1) and alone[("A7", "10")] == ("2", 0)
    # Elapsed hours count from the plate's first scan (2 h here), whatever the names count from.
    assert sorted(fields["timepoint_h"]) == [0.0, 6.0, 6.0, 6.0]
    # OUT already holds A7 field 2 as site 0 at hours 0 and 4: it keeps them, the rest comes after.
    known = {"A172": {"timepoints": [0.0, 4.0], "sites": {"A7": {"2|1": "0"}}}}
    laid, layouts = m.apply_layout(fields, known)
    got = {(w, f): (s, t) for w, f, s, t in laid[["well", "field", "site", "t_index"]].itertuples(index=False)}
    assert got == {("A7", "2"): ("0", 3), ("A7", "1"): ("1", 3), ("A7", "10"): ("2", 2), ("B1", "1"): ("0", 3)}
    assert set(laid["n_timepoints"]) == {4}
    assert layouts["A172"] == {"timepoints": [0.0, 4.0, 2.0, 8.0], "origin_h": 0.0,
                               "sites": {"A7": {"2|1": "0", "1|1": "1", "10|1": "2"}, "B1": {"1|1": "0"}}}
    # OUT's first scan (0 h) stays the origin: a plate that grows keeps its clock.
    assert sorted(laid["timepoint_h"]) == [2.0, 8.0, 8.0, 8.0]
    # Applying the layout it returned changes nothing: a rerun of the same files is stable.
    again, same = m.apply_layout(fields, layouts)
    pd.testing.assert_frame_equal(again, laid)
    assert same == layouts


def test_scan_memory_filesystem():
    fs = fsspec.filesystem("memory")
    fs.pipe("/plate1/sub/A172_Phase_B2_1_00d00h00m_1.png", b"x")
    fs.pipe("/plate1/sub/A172_Phase_B2_2_00d00h00m_1.png", b"x")
    man = m.scan("memory://plate1")
    assert all(p.startswith("memory://") for p in man.fields["path"])
    assert list(man.fields["site"]) == ["0", "1"]


def test_explicit_csv_manifest(tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.tif", "b.tif"], "plate": ["P1", "P1"], "well": ["C05", "C05"],
                  "field": [1, 1], "timepoint": [0, 2.5]}).to_csv(csv, index=False)
    man = m.build("unused", manifest=str(csv))
    assert list(man.fields["well"]) == ["C5", "C5"]
    assert list(man.fields["t_index"]) == [0, 1]


def test_manifest_errors(tmp_path):
    with pytest.raises(m.ManifestError, match="does not exist"):
        m.scan(str(tmp_path / "nope"))
    with pytest.raises(m.ManifestError, match="no images"):
        m.scan(str(tmp_path))
    (tmp_path / "x.tif").write_bytes(b"1")
    with pytest.raises(m.ManifestError, match="none matches"):
        m.scan(str(tmp_path))
    bad = tmp_path / "bad.csv"
    bad.write_text("path,well\na.tif,A1\n")
    with pytest.raises(m.ManifestError, match="lacks column"):
        m.load(str(bad))


def test_duplicate_fields_are_rejected(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "A172_Phase_A7_1_00d00h00m_1.tif").write_bytes(b"x")
    with pytest.raises(m.ManifestError, match="same plate/well/field/timepoint"):
        m.scan(str(tmp_path))
