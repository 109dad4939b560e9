"""Answers a biologist reads right (issue 34), tried as a user would on an Incucyte-named 16-bit time-lapse plate:
elapsed time, one row per well and timepoint, units, well names in any form, the instrument's intensities in
the Zarr plate, LoadData manifests, CytoTable/pycytominer and Incucyte exports, and one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
import zarr

from livecell_ray import open_results, pipeline
from livecell_ray.config import InferenceConfig, SegmentConfig

from .conftest import EXAMPLES

pytestmark = pytest.mark.slow  # runs the pipeline on a real local Ray

#: Two wells, two fields each, imaged three times four hours apart, as Incucyte names its exports.
WELLS, FIELDS, SCANS = ("B3", "C10"), (1, 2), ("2024y03m05d_14h30m", "2024y03m05d_18h30m", "2024y03m05d_22h30m")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livecell_ray.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def incucyte(tmp_path_factory, ray_module):
    """(source, OUT): 12 16-bit fields cut from real LIVECell images, segmented at a known pixel size."""
    src = tmp_path_factory.mktemp("vid")
    images = [tifffile.imread(p) for p in sorted(EXAMPLES.glob("*.tif"))]
    k = 0
    for well in WELLS:
        for f in FIELDS:
            for scan in SCANS:
                img = images[k % len(images)][:256, :256].astype(np.uint16) * 200 + 900  # a 12-bit camera's range
                k += 1
                tifffile.imwrite(src / f"VID42_{well}_{f}_{scan}.tif", img)
    out = tmp_path_factory.mktemp("vid-out") / "run"
    summary = pipeline.run(SegmentConfig(source=str(src), out=str(out), layout="incucyte", pixel_size=1.24,
                                         batch_size=6, inference=InferenceConfig(imgsz=256)))
    assert summary.fields_done == 12 and summary.fields_failed == 0
    return src, out


def test_time_is_elapsed_since_the_first_scan_and_the_acquisition_time_is_kept(incucyte):
    _, out = incucyte
    fields = open_results(str(out)).df("SELECT well, field, timepoint_h, acquired FROM fields ORDER BY acquired")
    assert sorted(fields["timepoint_h"].unique()) == [0.0, 4.0, 8.0]
    assert str(fields["acquired"].iloc[0]) == "2024-03-05 14:30:00"
    assert fields.groupby("timepoint_h")["acquired"].nunique().eq(1).all()
    growth = _cli("query", str(out), "growth", "--format", "json")
    assert growth.returncode == 0, growth.stderr
    assert all(r["n_timepoints"] == 3 for r in json.loads(growth.stdout))


def test_wells_are_one_row_per_well_and_timepoint_in_query_and_sql_alike(incucyte):
    _, out = incucyte
    p = _cli("query", str(out), "wells", "--format", "json", "--metrics",
             "fields,images,cells,confluence_pct,area_px_median,area_um2_median")
    assert p.returncode == 0, p.stderr
    rows = pd.DataFrame(json.loads(p.stdout))
    assert len(rows) == 6 and set(rows["timepoint_h"]) == {0.0, 4.0, 8.0}
    assert (rows["fields"] == 2).all() and (rows["images"] == 2).all()
    assert rows["confluence_pct"].between(0, 100).all() and rows["confluence_pct"].max() > 1  # percent
    np.testing.assert_allclose(rows["area_um2_median"], rows["area_px_median"] * 1.24 ** 2, rtol=1e-6)
    sql = _cli("sql", str(out), "SELECT * FROM wells ORDER BY plate, well, timepoint_h", "--format", "json")
    same = pd.DataFrame(json.loads(sql.stdout))
    assert len(same) == 6
    np.testing.assert_array_equal(same["cells"].to_numpy(), rows.sort_values(["well", "timepoint_h"])["cells"])
    pooled = pd.DataFrame(json.loads(_cli("query", str(out), "wells", "--by", "well", "--format", "json").stdout))
    assert len(pooled) == 2 and (pooled["fields"] == 2).all()  # two fields, each imaged three times
    last = pd.DataFrame(json.loads(_cli("query", str(out), "wells", "--last", "--format", "json").stdout))
    assert list(last["timepoint_h"]) == [8.0, 8.0]


@pytest.mark.parametrize("typed", ["b03", "B3", "b3"])
def test_a_well_matches_in_any_of_its_spellings(incucyte, typed):
    _, out = incucyte
    cells = _cli("query", str(out), "cells", "--well", typed, "--format", "csv")
    wells = _cli("query", str(out), "wells", "--well", typed, "--format", "csv")
    assert cells.returncode == 0 and wells.returncode == 0, cells.stderr + wells.stderr
    assert set(pd.read_csv(pd.io.common.StringIO(cells.stdout))["well"]) == {"B3"}
    assert len(pd.read_csv(pd.io.common.StringIO(wells.stdout))) == 3


def test_the_zarr_image_is_the_instruments_and_napari_measures_what_the_table_says(incucyte):
    """The image as the camera wrote it (uint16, its values), and a cell's mean intensity over its label in the
    Zarr plate (what napari's measurement gives) equal to the cells table's."""
    src, out = incucyte
    res = open_results(str(out))
    f = res.df("SELECT * FROM fields ORDER BY n_cells DESC LIMIT 1").iloc[0]
    group = zarr.open_group(str(out / f["zarr_path"]), mode="r")
    image, labels = group["0"][int(f["t_index"])], group["labels/cells/0"][int(f["t_index"])]
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, tifffile.imread(f["path"]))
    cells = res.df(f"SELECT label, mean_intensity FROM cells WHERE field_id = '{f['field_id']}'")
    assert len(cells) == int(f["n_cells"]) > 5
    for label, mean in zip(cells["label"], cells["mean_intensity"]):
        assert image[labels == label].mean() == pytest.approx(mean, rel=1e-9)


def test_a_cellprofiler_loaddata_csv_is_a_manifest(incucyte, tmp_path, ray_module):
    src, out = incucyte
    names = sorted(p.name for p in src.glob("*.tif"))[:4]
    pd.DataFrame({"FileName_Phase": names, "PathName_Phase": [str(src)] * 4, "FileName_GFP": names,
                  "PathName_GFP": [str(src)] * 4, "Metadata_Plate": ["VID42"] * 4,
                  "Metadata_Well": ["B03", "B03", "C10", "C10"], "Metadata_Site": [1, 2, 1, 2],
                  "Metadata_Timepoint": [0, 0, 6, 6]}).to_csv(tmp_path / "load_data.csv", index=False)
    refused = _cli("segment", str(src), str(tmp_path / "o"), "--manifest", str(tmp_path / "load_data.csv"))
    assert refused.returncode != 0 and "give --channel" in refused.stderr and "Traceback" not in refused.stderr
    summary = pipeline.run(SegmentConfig(source=str(src), out=str(tmp_path / "o"), batch_size=4,
                                         manifest=str(tmp_path / "load_data.csv"), channel="Phase",
                                         inference=InferenceConfig(imgsz=256)))
    assert summary.fields_done == 4 and summary.fields_failed == 0
    got = open_results(str(tmp_path / "o")).df("SELECT well, field, timepoint_h FROM fields ORDER BY path")
    assert list(got["well"]) == ["B3", "B3", "C10", "C10"] and list(got["timepoint_h"]) == [0, 0, 6, 6]


def test_pycytominer_aggregates_and_normalises_the_cytotable_export_with_its_defaults(incucyte, tmp_path):
    pycytominer = pytest.importorskip("pycytominer", reason="pycytominer (test extra) not installed")
    _, out = incucyte
    p = _cli("export", str(out), str(tmp_path / "cells.parquet"))
    assert p.returncode == 0, p.stderr
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    n = open_results(str(out)).df("SELECT count(*) AS n FROM cells")["n"].iloc[0]
    assert len(cells) == n
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Timepoint_h", "Cells_AreaShape_Area",
            "Cells_Intensity_MeanIntensity_Phase"} <= set(cells.columns)
    profiles = pycytominer.aggregate(cells)  # strata Metadata_Plate, Metadata_Well; features inferred
    assert len(profiles) == 2
    assert profiles.set_index("Metadata_Well").loc["B3", "Cells_AreaShape_Area"] == pytest.approx(
        cells.loc[cells["Metadata_Well"] == "B3", "Cells_AreaShape_Area"].median())
    normalised = pycytominer.normalize(profiles, samples="all")
    assert normalised.filter(like="Cells_").notna().all().all()
    wide = _cli("export", str(out), str(tmp_path / "conf.txt"), "--as", "incucyte", "--metric", "confluence_pct")
    assert wide.returncode == 0, wide.stderr
    table = pd.read_csv(tmp_path / "conf.txt", sep="\t")
    assert list(table.columns) == ["Date Time", "Elapsed", "B3", "C10"] and list(table["Elapsed"]) == [0, 4, 8]


def test_tables_fit_80_columns_and_print_empty_as_blank(incucyte):
    _, out = incucyte
    for what in ("wells", "cells", "fields"):
        p = _cli("query", str(out), what, "--limit", "4", env={"COLUMNS": "80"})
        assert p.returncode == 0, p.stderr
        assert max(map(len, p.stdout.splitlines())) <= 80, p.stdout
        assert "nan" not in p.stdout and "None" not in p.stdout and "…" not in p.stdout
        assert "plate" in p.stdout and "well" in p.stdout
    assert "--all-columns" in _cli("query", str(out), "cells", "--limit", "2", env={"COLUMNS": "80"}).stderr


def test_another_plate_is_refused_unless_appended_and_run_json_lists_every_source(incucyte, tmp_path, ray_module):
    src, out = incucyte
    run = tmp_path / "run"
    shutil.copytree(out, run)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next(src.glob("VID42_B3_1_*")), other / "VID43_D4_1_2024y03m06d_10h00m.tif")
    later = tmp_path / "later"  # the same plate's next scan, in a folder of its own: taken, and recorded
    later.mkdir()
    shutil.copy(next(src.glob("VID42_B3_1_*")), later / "VID42_B3_1_2024y03m06d_02h30m.tif")
    grown = _cli("segment", str(later), str(run), "--layout", "incucyte", "--pixel-size", "1.24", "--imgsz", "256")
    assert grown.returncode == 0, grown.stderr[-2000:]
    assert 12.0 in set(open_results(str(run)).df("SELECT timepoint_h FROM fields")["timepoint_h"])
    args = ["segment", str(other), str(run), "--layout", "incucyte", "--pixel-size", "1.24", "--imgsz", "256"]
    refused = _cli(*args)
    assert refused.returncode != 0 and "--append" in refused.stderr and str(src) in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _cli(*args, "--append").returncode == 0
    record = json.loads((run / "run.json").read_text())
    assert record["sources"] == [str(src), str(later), str(other)]
    assert set(open_results(str(run)).df("SELECT DISTINCT plate FROM fields")["plate"]) == {"VID42", "VID43"}


def test_a_query_never_replaces_the_saved_plate_map_unless_told(incucyte, tmp_path):
    _, out = incucyte
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (tmp_path / "a.csv").write_text("Well;Compound;Dose;Unit\nB03;X;0,5;uM\nC10;X;5;uM\n")  # Excel's CSV
    (tmp_path / "b.csv").write_text("WELL,Compound\nB3,Y\nC10,Y\n")
    first = _cli("query", str(run), "wells", "--platemap", str(tmp_path / "a.csv"), "--format", "json")
    assert first.returncode == 0, first.stderr
    assert {r["compound"] for r in json.loads(first.stdout)} == {"X"}
    assert sorted({r["dose"] for r in json.loads(first.stdout)}) == [0.5, 5.0]
    once = _cli("query", str(run), "wells", "--platemap", str(tmp_path / "b.csv"), "--format", "json")
    assert {r["compound"] for r in json.loads(once.stdout)} == {"Y"} and "this query only" in once.stderr
    kept = _cli("query", str(run), "wells", "--format", "json")
    assert {r["compound"] for r in json.loads(kept.stdout)} == {"X"}
    _cli("query", str(run), "wells", "--platemap", str(tmp_path / "b.csv"), "--save-platemap")
    assert {r["compound"] for r in json.loads(_cli("query", str(run), "wells", "--format", "json").stdout)} == {"Y"}


def test_layout_and_pattern_together_are_one_line(tmp_path):
    p = _cli("segment", str(EXAMPLES), str(tmp_path / "o"), "--layout", "incucyte", "--pattern", "(?P<well>.*)")
    assert p.returncode != 0 and "not both" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_outputs_of_format_0_2_read_with_elapsed_time(incucyte, tmp_path):
    """An OUT written before timepoint_h existed: its views count hours from each plate's first scan."""
    _, out = incucyte
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for table in ("fields", "cells", "failures"):
        for p in (run / table).rglob("*.parquet"):
            t = pq.read_table(p)
            pq.write_table(t.drop_columns([c for c in ("timepoint_h", "acquired") if c in t.column_names]), p)
    res = open_results(str(run))
    assert sorted(res.df("SELECT DISTINCT timepoint_h FROM cells")["timepoint_h"]) == [0.0, 4.0, 8.0]
    assert len(res.wells()) == 6


def test_an_image_array_of_format_0_2_keeps_the_normalised_plane(tmp_path):
    """A new timepoint of a series whose image array an earlier version made uint8 is stored as that version
    stored it (the normalised plane), so one array never mixes two meanings; an array of another depth that
    cannot hold the values is refused."""
    from livecell_ray import store

    outputs = store.Outputs(str(tmp_path / "o"))
    old = store.array_document((2, 8, 8), "|u1")
    raw = np.full((8, 8), 3000, np.uint16)
    norm = np.full((8, 8), 77, np.uint8)
    _, files = store.mask_files(outputs, "P", "A", 1, "0", 1, 2, raw, np.zeros((8, 8), np.uint32),
                                [old, None], norm)
    chunk = next(v for k, v in files.items() if k.endswith("/A/1/0/0/c/1/0/0"))
    assert np.frombuffer(__import__("numcodecs").Zstd().decode(chunk), np.uint8).tolist() == [77] * 64
    # An 8-bit camera's plane: into a 0.2 array the normalised plane still, into a 0.3 one its own values.
    raw8 = np.full((8, 8), 30, np.uint8)
    for doc, want in ((old, 77), (store.array_document((2, 8, 8), "|u1", None, True), 30)):
        _, files = store.mask_files(outputs, "P", "A", 1, "0", 1, 2, raw8, np.zeros((8, 8), np.uint32), [doc, None],
                                    norm)
        chunk = next(v for k, v in files.items() if k.endswith("/A/1/0/0/c/1/0/0"))
        assert set(np.frombuffer(__import__("numcodecs").Zstd().decode(chunk), np.uint8)) == {want}
    with pytest.raises(ValueError, match="one bit depth"):
        store.mask_files(outputs, "P", "A", 1, "0", 1, 2, raw.astype(np.float32), np.zeros((8, 8), np.uint32),
                         [store.array_document((2, 8, 8), "<u2", None, True), None])
