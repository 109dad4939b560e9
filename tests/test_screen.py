"""Screen answers: plate maps checked and kept, growth rates and dose-response fits recovered from known curves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from livecell_ray import pipeline
from livecell_ray.answers import dose_response, growth
from livecell_ray.answers.query import open_results
from livecell_ray.config import SegmentConfig
from livecell_ray.plate import platemap

from .conftest import EXAMPLES


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, ray_module):
    """The bundled example plate segmented once (10 wells, one timepoint each)."""
    out = tmp_path_factory.mktemp("screen") / "run"
    assert pipeline.run(SegmentConfig(source=str(EXAMPLES), out=str(out))).fields_done == 10
    return out


def _growth_curve(seed: int, rate: float = 0.03, lag: float = 12.0, plateau: float = 60.0, noise: float = 0.05):
    """Counts every 4 h for 4 days: flat during the lag, exponential at `rate`, flat from confluence on."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, 96, 4.0)
    log_n = np.log(50) + np.clip(np.minimum(t, plateau) - lag, 0, None) * rate
    return t, np.exp(log_n + rng.normal(0, noise, len(t)))


@pytest.mark.parametrize("seed", range(8))
def test_growth_rate_is_recovered_over_the_exponential_phase(seed):
    t, n = _growth_curve(seed)
    r = growth.fit_well(t, n)
    assert r["reason"] is None
    assert r["growth_rate_per_h"] == pytest.approx(0.03, rel=0.12)
    assert r["doubling_time_h"] == pytest.approx(np.log(2) / 0.03, rel=0.12)
    # the window lies in the exponential phase and covers most of it, not the lag or the plateau
    assert 8.0 <= r["t_start_h"] <= 20.0 and 48.0 <= r["t_end_h"] <= 64.0 and r["n_points"] >= 8
    # one log-linear fit over the whole series would have said much less
    assert np.polyfit(t, np.log(n), 1)[0] < 0.7 * r["growth_rate_per_h"]


def test_growth_gives_reasons_instead_of_numbers():
    t, n = _growth_curve(1)
    few = growth.fit_well(t[:2], n[:2])
    assert np.isnan(few["growth_rate_per_h"]) and "too few timepoints" in few["reason"]
    rng = np.random.default_rng(3)
    flat = growth.fit_well(t, 100 * np.exp(rng.normal(0, 0.05, len(t))))
    assert np.isnan(flat["doubling_time_h"]) and flat["reason"].startswith("no growth")
    dying = growth.fit_well(t, 400 * np.exp(-0.02 * t))
    assert dying["reason"].startswith("no growth")
    empty = growth.fit_well(t, np.zeros(len(t)))
    assert "too few timepoints" in empty["reason"]


def test_growth_table_is_one_row_per_well():
    rows = []
    for k, well in enumerate(["A1", "A2", "B1"]):
        t, n = _growth_curve(k, rate=0.02 + 0.01 * k)
        rows += [{"plate": "P", "well": well, "timepoint": a, "cells_per_field_mean": b} for a, b in zip(t, n)]
    g = growth.growth_table(pd.DataFrame(rows))
    assert list(g["well"]) == ["A1", "A2", "B1"]
    assert g["growth_rate_per_h"].to_numpy() == pytest.approx([0.02, 0.03, 0.04], rel=0.15)


@pytest.mark.parametrize("seed", range(6))
def test_dose_response_parameters_are_recovered(seed):
    rng = np.random.default_rng(seed)
    doses = np.repeat(np.logspace(-3, 2, 8), 3)
    y = dose_response.logistic4(doses, 5.0, 100.0, 0.5, 1.2) + rng.normal(0, 3, len(doses))
    f = dose_response.fit(doses, y)
    assert f["reason"] is None
    assert f["ic50"] == pytest.approx(0.5, rel=0.25)
    assert f["hill"] == pytest.approx(1.2, rel=0.3)
    assert f["top"] == pytest.approx(100, abs=6) and f["bottom"] == pytest.approx(5, abs=6)
    assert f["ic50_low"] < f["ic50"] < f["ic50_high"] and f["ic50_high"] / f["ic50_low"] < 3
    assert f["n_doses"] == 8 and f["n_wells"] == 24


def test_dose_response_confidence_interval_covers_the_truth_mostly():
    covered = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        doses = np.repeat(np.logspace(-2, 2, 7), 2)
        f = dose_response.fit(doses, dose_response.logistic4(doses, 0, 100, 2.0, 1.0) + rng.normal(0, 5, len(doses)))
        covered += f["ic50_low"] <= 2.0 <= f["ic50_high"]
    assert covered >= 32  # a 95% interval; 40 tries


def test_dose_response_reasons():
    few = dose_response.fit(np.array([1.0, 10.0, 100.0]), np.array([90.0, 50.0, 10.0]))
    assert np.isnan(few["ic50"]) and "3 distinct positive doses" in few["reason"]
    doses = np.logspace(-3, -1, 6)
    out_of_range = dose_response.fit(doses, dose_response.logistic4(doses, 0, 100, 1000.0, 1.0))
    assert "outside the doses tested" in out_of_range["reason"]


def test_a_flat_response_gives_an_unbounded_interval_not_an_error():
    """No effect of the compound (noise around 100 over ten decades): the interval's bound is inf, the
    reason says the fit explains nothing; 10**x of the wide interval once raised OverflowError."""
    doses = np.repeat(10.0 ** np.arange(-5, 5, 1.0), 4)
    y = 100 + np.random.default_rng(1).normal(0, 5, len(doses))
    out = dose_response.fit(doses, y)
    assert out["ic50_high"] == np.inf and out["ic50_low"] == 0.0
    assert "poor fit" in out["reason"]


def _wells_with_controls() -> pd.DataFrame:
    doses = np.logspace(-2, 2, 8)
    rows = [{"plate": "P", "well": f"B{i + 2}", "compound": "X", "dose": d, "unit": "uM", "control": None,
             "cells": 20 + 180 * (1 - d / (d + 1.0))} for i, d in enumerate(doses)]
    rows += [{"plate": "P", "well": f"A{i + 1}", "compound": None, "dose": np.nan, "unit": None,
              "control": "vehicle", "cells": 200.0} for i in range(3)]
    rows += [{"plate": "P", "well": f"H{i + 1}", "compound": "staurosporine", "dose": 1.0, "unit": "uM",
              "control": "positive", "cells": 20.0} for i in range(3)]
    return pd.DataFrame(rows)


def test_dose_response_is_normalised_to_the_plate_controls():
    wells = _wells_with_controls()
    values, normalised = dose_response.normalise(wells, "cells")
    assert normalised
    assert values[wells["control"] == "vehicle"].to_numpy() == pytest.approx(100.0)
    assert values[wells["control"] == "positive"].to_numpy() == pytest.approx(0.0)
    table = dose_response.dose_response_table(wells, "cells")
    assert list(table["compound"]) == ["X"]  # controls are not a compound's curve
    x = table.iloc[0]
    assert x["normalised"] and x["unit"] == "uM"
    assert x["ic50"] == pytest.approx(1.0, rel=0.05) and x["top"] == pytest.approx(100, abs=2)
    assert x["bottom"] == pytest.approx(0, abs=2)


# ---------------------------------------------------------------- plate maps
def _write(tmp_path, text: str, name: str = "map.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, message", [
    ("well,compound\nA1,x\nA01,y\n", "line 3: well A1 appears twice (first at line 2)"),
    ("well,dose\nA1,1\nA2,10 uM\n", "line 3: dose '10 uM' is not a number"),
    ("well,compound,dose,unit\nA1,x,1,uM\nA2,x,2,nM\n", "line 3: unit 'nM' for x differs from 'uM'"),
    ("well,dose\nA1,1\n7A,2\n", "line 3: cannot parse well name '7A'"),
    ("compound,dose\nx,1\n", "no 'well' column"),
    ("plate,well\nP,A1\n,A2\n", "line 3: empty plate"),
    ("well,plate_format\nA1,97\n", "line 2: plate_format '97' is not one of"),
])
def test_bad_plate_maps_name_the_file_and_the_row(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(platemap.PlateMapError) as err:
        platemap.read(path)
    assert str(err.value).startswith(path) and message in str(err.value)


def test_map_wells_must_exist_on_the_plate_format(tmp_path):
    imaged = pd.DataFrame({"plate": ["P", "P"], "well": ["A1", "H12"]})
    ok = platemap.read(_write(tmp_path, "well,compound\nA1,x\nH12,y\n"))
    platemap.check_wells(ok, imaged, "map.csv")
    off = platemap.read(_write(tmp_path, "well,compound\nA1,x\nI1,y\n"))
    with pytest.raises(platemap.PlateMapError, match=r"line 3: well I1 does not exist on P's 96-well format"):
        platemap.check_wells(off, imaged, "map.csv")
    declared = platemap.read(_write(tmp_path, "well,plate_format\nA1,384\nI1,384\n"))
    platemap.check_wells(declared, imaged, "map.csv")  # a 384-well map of a plate imaged in its first 96 wells


def test_mismatches_list_both_directions():
    pm = pd.DataFrame({"plate": ["P", "P"], "well": ["A1", "A2"]})
    imaged = pd.DataFrame({"plate": ["P", "P"], "well": ["A1", "B1"]})
    m = platemap.mismatches(pm, imaged)
    assert m.to_dict("records") == [{"plate": "P", "well": "A2", "issue": "in the plate map, never imaged"},
                                    {"plate": "P", "well": "B1", "issue": "imaged, not in the plate map"}]


@pytest.mark.slow
def test_plate_map_through_queries_and_kept_beside_results(example_run, tmp_path):
    """A map given once is kept (and recorded in run.json); wells, growth, dose_response carry its columns."""
    out = tmp_path / "run"
    shutil.copytree(example_run, out)
    path = _write(tmp_path, "well,compound,dose,unit,control,cell_line\nA7,,,,vehicle,A172\nA3,d,0.1,uM,,BT474\n"
                            "B4,d,1,uM,,BV2\nA10,d,10,uM,,Huh7\nE4,d,100,uM,,MCF7\nH12,d,1000,uM,,none\n")
    res = open_results(str(out), platemap=path)
    run = json.loads((out / "run.json").read_text())
    assert run["platemap"]["source"] == path and run["platemap"]["rows"] == 6
    again = open_results(str(out))  # no map given: the kept one applies
    wells = again.wells()
    assert {"compound", "dose", "unit", "control", "cell_line"} <= set(wells.columns)
    assert wells.set_index(["plate", "well"]).loc[("BT474", "A3"), "dose"] == 0.1
    assert again.df("SELECT count(*) AS n FROM wells WHERE compound = 'd'")["n"][0] == 4  # the SQL view too
    issues = again.platemap_issues()
    assert ("SkBr3", "E3", "imaged, not in the plate map") in set(map(tuple, issues.to_numpy()))
    g = again.growth()
    assert len(g) == len(wells) and g["reason"].str.startswith("too few timepoints").all() and "compound" in g
    dr = again.dose_response("cells_per_field_mean")
    assert list(dr["compound"]) == ["d"] and dr["n_doses"][0] == 4 and bool(dr["normalised"][0])
    # a new map given to a query is that query's only; asked to, it replaces the kept one
    once = open_results(str(out), platemap=_write(tmp_path, "well,treatment\nA7,none\n", "map2.csv"))
    assert once.platemap_use == "this query only" and "compound" not in once.wells().columns
    assert "compound" in open_results(str(out)).wells().columns
    open_results(str(out), platemap=str(tmp_path / "map2.csv"), save_platemap=True)
    assert "compound" not in open_results(str(out)).wells().columns
    assert res.platemap is not None


@pytest.mark.slow
def test_cli_rejects_a_bad_map_and_writes_nothing(example_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(example_run, out)
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    bad = _write(tmp_path, "well,dose\nA7,1\nA7,2\n")
    for args in (["query", str(out), "wells", "--platemap", bad], ["report", str(out), "--platemap", bad,
                                                                    "--html", str(tmp_path / "r.html")]):
        p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", *args], capture_output=True, text=True)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().startswith("error:") and "appears twice" in p.stderr and bad in p.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert not (tmp_path / "r.html").exists()
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "segment", str(EXAMPLES),
                        str(tmp_path / "new"), "--platemap", _write(tmp_path, "well\nA7\nZ40\n", "m3.csv")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "does not exist on" in p.stderr
    assert not (tmp_path / "new").exists()
