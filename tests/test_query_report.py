"""Per-well queries equal an independent pandas computation; the HTML report renders in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import tifffile

from livecell_ray import open_results, pipeline
from livecell_ray.config import InferenceConfig, SegmentConfig

from .conftest import EXAMPLES

pytestmark = pytest.mark.slow  # starts Ray (local runtimes, clusters) or a browser

SOURCES = sorted(EXAMPLES.glob("*.tif"))


@pytest.fixture(scope="module")
def plate96(tmp_path_factory, ray_module):
    """A synthetic 96-well time-lapse plate (2 timepoints) tiled from real LIVECell fields, segmented."""
    src = tmp_path_factory.mktemp("p96")
    tiles = []
    for p in SOURCES:
        img = tifffile.imread(p)
        cell_type = p.name.split("_")[0]
        for y in (0, 256):
            for x in (0, 224, 448):
                tiles.append((cell_type, img[y:y + 256, x:x + 256]))
    rows = "ABCDEFGH"
    k = 0
    for r in rows:
        for c in range(1, 13):
            for t in range(2):
                _, tile = tiles[k % len(tiles)]
                k += 1
                tifffile.imwrite(src / f"P96_Phase_{r}{c}_1_00d{12 * t:02d}h00m_1.tif", tile)
    out = tmp_path_factory.mktemp("o96") / "run"
    cfg = SegmentConfig(source=str(src), out=str(out), batch_size=8, pixel_size=1.0,
                        inference=InferenceConfig(imgsz=256))
    summary = pipeline.run(cfg)
    assert summary.fields_done == 192
    return out


@pytest.fixture(scope="module")
def example_out(tmp_path_factory, ray_module):
    out = tmp_path_factory.mktemp("oex") / "run"
    pipeline.run(SegmentConfig(source=str(EXAMPLES), out=str(out)))
    return out


def _table(out, name) -> pd.DataFrame:
    return pads.dataset(str(out / name), format="parquet", partitioning="hive").to_table().to_pandas()


def _expected_wells(out, by_time: bool) -> pd.DataFrame:
    fields, cells = _table(out, "fields"), _table(out, "cells")
    keys = ["plate", "well"] + (["timepoint_h"] if by_time else [])
    for d in (fields, cells):
        d["plate"], d["well"] = d["plate"].astype(str), d["well"].astype(str)
    fields["series"] = fields["field"].astype(str) + "|" + fields["crop"].astype(str)
    f = fields.groupby(keys).agg(fields=("series", "nunique"), images=("field_id", "size"), cells=("n_cells", "sum"),
                                 cells_per_field_mean=("n_cells", "mean"), confluence_pct=("confluence", "mean"))
    f["confluence_pct"] *= 100
    c = cells.groupby(keys).agg(area_px_median=("area_px", "median"), area_um2_median=("area_um2", "median"),
                                eccentricity_mean=("eccentricity", "mean"), solidity_mean=("solidity", "mean"),
                                intensity_mean=("mean_intensity", "mean"))
    return f.join(c, how="left").reset_index().sort_values(keys).reset_index(drop=True)


METRICS = ["fields", "images", "cells", "cells_per_field_mean", "confluence_pct", "area_px_median", "area_um2_median",
           "eccentricity_mean", "solidity_mean", "intensity_mean"]


@pytest.mark.parametrize("by_time", [False, True])
@pytest.mark.parametrize("which", ["example", "plate96"])
def test_wells_equal_pandas(request, which, by_time):
    out = request.getfixturevalue("example_out" if which == "example" else "plate96")
    got = open_results(str(out)).wells(METRICS, by_timepoint=by_time)
    exp = _expected_wells(out, by_time)
    assert len(got) == len(exp) == (10 if which == "example" else (192 if by_time else 96))
    assert exp["cells"].sum() > 0
    for m in METRICS:
        np.testing.assert_allclose(got[m].to_numpy(float), exp[m].to_numpy(float), rtol=1e-9, err_msg=m)


def test_query_cli_json_and_where(plate96):
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "query", str(plate96), "wells", "--by",
                        "timepoint", "--where", "timepoint_h = 12", "--metrics", "cells,confluence", "--format",
                        "json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert len(rows) == 96 and {r["timepoint_h"] for r in rows} == {12.0}
    assert {"confluence_pct", "cells"} <= set(rows[0])  # 'confluence' is the 0.2 name of confluence_pct
    exp = _expected_wells(plate96, True)
    exp = exp[exp["timepoint_h"] == 12].set_index("well")["cells"]
    assert {r["well"]: r["cells"] for r in rows} == {w: int(v) for w, v in exp.items()}


def test_cells_and_sql(plate96):
    res = open_results(str(plate96))
    # DuckDB's progress bar (queries over 2 s) is drawn on stdout, where `query --format csv` writes.
    assert res.sql("SELECT current_setting('enable_progress_bar')").fetchall() == [(False,)]
    n = res.sql("SELECT count(*) FROM cells WHERE well = 'A7'").fetchall()[0][0]
    assert n == int((_table(plate96, "cells")["well"].astype(str) == "A7").sum())
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "query", str(plate96), "cells", "--well", "A7",
                        "--limit", "5", "--format", "csv"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1 + min(5, n)
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "sql", str(plate96), "SELECT nope FROM cells"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and p.stderr.startswith("error: query failed")


def test_report_renders_in_headless_chromium(plate96, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (README's test command installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) not installed")
    html = tmp_path / "report.html"
    out = tmp_path / "run"
    shutil.copytree(plate96, out)  # the plate map is kept beside the results: not in the shared fixture's
    # A 96-well screen: vehicle controls in column 1, positive controls in column 12, two compounds at ten doses.
    rows = ["well,compound,dose,unit,control"]
    for r in "ABCDEFGH":
        rows.append(f"{r}1,,,,vehicle")
        rows.append(f"{r}12,staurosporine,1,uM,positive")
        for c in range(2, 12):
            rows.append(f"{r}{c},{'X' if r in 'ABCD' else 'Y'},{10.0 ** (c - 7):g},uM,")
    (tmp_path / "map.csv").write_text("\n".join(rows) + "\n")
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "report", str(out), "--html", str(html),
                        "--platemap", str(tmp_path / "map.csv")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(html.as_uri())
        imgs = page.evaluate("Array.from(document.images).map(i => [i.className, i.naturalWidth, i.complete])")
        alts = page.evaluate("Array.from(document.images).map(i => i.alt)")
        # An overlay opens at full resolution on a click, and closes on the next.
        first = page.locator("img.overlay").first
        small = first.bounding_box()["width"]
        first.click()
        full = first.bounding_box()["width"]
        first.click()
        back = first.bounding_box()["width"]
        tables = page.evaluate("Array.from(document.querySelectorAll('td')).map(t => t.textContent)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    kinds = {c for c, w, ok in imgs if w > 0 and ok}
    assert {"heatmap", "growth", "areas", "overlay", "treatment", "dose"} <= kinds
    assert sum(1 for c, _, _ in imgs if c == "dose") == 2  # one curve per compound, controls excluded
    assert sum(1 for c, _, _ in imgs if c == "overlay") == 192  # each well at its first and last timepoint
    assert sum(1 for c, _, _ in imgs if c == "heatmap") == 4
    assert sum(1 for c, _, _ in imgs if c == "heatmap small") == 2  # cells per field at each of the 2 timepoints
    # Heatmaps say in words what they show and at which time; tables print no NaN.
    heat = [a for (c, _, _), a in zip(imgs, alts) if c == "heatmap"]
    assert "P96: confluence (%), at 12 h" in heat and "P96: median cell area (µm²), at 12 h" in heat, heat
    assert not any(t.strip().lower() in ("nan", "none") for t in tables)
    # Shown 480 px wide; once clicked, the field's own 256 px (and the 1 px border each side).
    assert full == 256 + 2 and small > full and back == small
    assert all(w == 256 for c, w, _ in imgs if c == "overlay")  # every overlay is the field at full resolution
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_queries_and_the_report_on_a_laptop_import_neither_ray_nor_torch(example_out, tmp_path):
    """A finished OUT answers in a process that never imports Ray or torch (tests/test_layers.py: the rule)."""
    html = tmp_path / "r.html"
    code = ("import sys, livecell_ray\n"
            "from livecell_ray.answers import report\n"
            f"res = livecell_ray.open_results({str(example_out)!r})\n"
            "w = res.wells(['cells_per_field_mean', 'confluence_pct'])\n"
            f"report.write({str(example_out)!r}, {str(html)!r})\n"
            "print(int(w['cells_per_field_mean'].sum()),\n"
            "      [m for m in ('ray', 'torch', 'ultralytics') if m in sys.modules])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    cells, imported = p.stdout.split(maxsplit=1)
    assert int(cells) > 0 and imported.strip() == "[]"
    assert html.stat().st_size > 10_000
