"""Instrument naming presets (--layout): files named exactly as each vendor's export names them.

Where each convention is documented (public sources, quoted by file name):
- Incucyte image export, `<experiment>_<well>_<field>_<YYYY>y<MM>m<DD>d_<hh>h<mm>m.tif`: the Incucyte
  export parser in TylerJost/incucyteClusterTracking (nameMinerIncucyte.m: well the 2nd `_` part, date
  the 4th as YYYYyMMmDDd, time the 5th as HHhMMm).
- MetaXpress (ImageXpress), `<plate>_<well>_s<site>_w<wavelength><GUID>.tif`, time-lapse in
  `TimePoint_<n>/`: CarragherLab/parserix README ("val screen_B02_s1_w3E75611A2-A874-4065-BDAC-
  EE2467105EEB.tif") and the EZStitcher docs' ImageXpress section ("A01_s1_w1.tif", TimePoint folders).
- Harmony (Opera Phenix, Operetta), `r<row>c<col>f<field>p<plane>-ch<channel>sk<t>fk1fl1.tiff`: the
  Cell Painting Gallery's JUMP pilot (source_4, ".../Images/r01c01f01p01-ch1sk1fk1fl1.tiff").
- HCS Studio (CellInsight, ArrayScan), `<prefix>_<plate>_<well>f<field>d<channel>.TIF`: CellProfiler's
  ExampleHT29 ("AS_09125_050116030001_D03f00d0.tif") and cellomics_semantic_filename's docstring
  ("MFGTMP_140206180002_A01f00d0.TIF").
- Gen5 (Cytation), `<well>_<read>_<channel #>_<site>_<channel name>_<image #>.tif`: multiWellAnalysis'
  Cytation 5 docs ("B5_03_1_1_Bright Field_001.tif", one file a frame).
- CellVoyager (CV7000/CV8000), `<plate>_<well>_T<t>F<field>L<l>A<a>Z<z>C<channel>.tif`: the CV7000
  filename extractor in a Fiji plugin ("AssayPlate_Greiner_#655090_C02_T0001F001L01A01Z01C01.tif") and
  the Cell Painting Gallery (cpg0016 source_10, "Dest210809-141456_K06_T0001F001L01A01Z01C01.tif").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from livecell_ray import pipeline, store
from livecell_ray.config import SegmentConfig
from livecell_ray.plate import manifest
from livecell_ray.plate.layouts import LAYOUTS

from .conftest import EXAMPLES

CLI = [sys.executable, "-m", "livecell_ray.cli"]
PHASE = EXAMPLES / "SKOV3_Phase_G4_1_00d12h00m_2.tif"
OTHER = EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif"

# layout -> (files (relative paths), channel to pick, expected (plate, well, field, timepoint) per phase file)
CASES = {
    "incucyte": (["VID1234_B3_1_2024y03m05d_14h30m.tif", "VID1234_B3_1_2024y03m05d_18h30m.tif",
                  "VID1234_C10_2_2024y03m05d_14h30m.tif"], None,
                 [("VID1234", "B3", "1", 211_934.5), ("VID1234", "B3", "1", 211_938.5),
                  ("VID1234", "C10", "2", 211_934.5)]),
    "imagexpress": (["TimePoint_1/Screen1_B02_s1_w1.tif", "TimePoint_1/Screen1_B02_s1_w2.tif",
                     "TimePoint_2/Screen1_B02_s1_w1.tif", "TimePoint_2/Screen1_B02_s1_w2.tif",
                     "TimePoint_1/val screen_B02_s2_w1E75611A2-A874-4065-BDAC-EE2467105EEB.tif"], "1",
                    [("Screen1", "B2", "1", 1.0), ("Screen1", "B2", "1", 2.0), ("val screen", "B2", "2", 1.0)]),
    "operetta": (["r02c03f01p01-ch1sk1fk1fl1.tiff", "r02c03f01p01-ch2sk1fk1fl1.tiff",
                  "r02c03f02p01-ch1sk2fk1fl1.tiff"], "1",
                 [("plate", "B3", "1", 1.0), ("plate", "B3", "2", 2.0)]),
    "cellinsight": (["MFGTMP_140206180002_A01f00d0.TIF", "MFGTMP_140206180002_A01f00d1.TIF",
                     "AS_09125_050116030001_D03f00d0.tif"], "0",
                    [("140206180002", "A1", "0", 0.0), ("050116030001", "D3", "0", 0.0)]),
    "cytation": (["B5_03_1_1_Bright Field_001.tif", "B5_03_2_1_GFP_001.tif", "B5_03_1_1_Bright Field_002.tif"],
                 "Bright Field", [("plate", "B5", "1", 1.0), ("plate", "B5", "1", 2.0)]),
    "cellvoyager": (["AssayPlate_Greiner_#655090_C02_T0001F001L01A01Z01C01.tif",
                     "AssayPlate_Greiner_#655090_C02_T0001F001L01A02Z01C02.tif",
                     "Dest210809-141456_K06_T0001F001L01A01Z01C01.tif"], "1",
                    [("AssayPlate_Greiner_#655090", "C2", "1", 1.0), ("Dest210809-141456", "K6", "1", 1.0)]),
}


def _plate(tmp_path: Path, files: list[str]) -> Path:
    """The files, each a real field (the phase ones) or another real image (other channels)."""
    root = tmp_path / "plate"
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        phase = any(t in f for t in ("_w1", "-ch1", "d0.", "Bright", "C01")) or "VID" in f
        shutil.copy(PHASE if phase else OTHER, p)
    return root


@pytest.mark.parametrize("layout", sorted(CASES))
def test_each_preset_reads_its_instruments_names(layout, tmp_path):
    files, channel, expected = CASES[layout]
    man = manifest.build(str(_plate(tmp_path, files)), layout=layout, channel=channel)
    got = sorted(zip(man.fields["plate"], man.fields["well"], man.fields["field"], man.fields["timepoint"]))
    assert got == sorted(expected)
    assert man.unmatched == []
    assert manifest.parse_name(LAYOUTS[layout].example, LAYOUTS[layout].pattern) is not None


def test_a_plate_of_several_channels_needs_channel(tmp_path):
    files, _, _ = CASES["imagexpress"]
    p = subprocess.run([*CLI, "segment", str(_plate(tmp_path, files)), str(tmp_path / "out"), "--layout",
                        "imagexpress"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error:"), p.stderr
    assert "2 channels (1, 2)" in p.stderr and "--channel" in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_preset_matching_nothing_names_its_example_and_the_first_file(tmp_path):
    plate = tmp_path / "plate"
    plate.mkdir()
    shutil.copy(PHASE, plate / PHASE.name)
    p = subprocess.run([*CLI, "segment", str(plate), str(tmp_path / "out"), "--layout", "operetta"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error:"), p.stderr
    assert "r02c03f01p01-ch1sk1fk1fl1.tiff" in p.stderr and PHASE.name in p.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_preset_is_one_clear_line(tmp_path):
    p = subprocess.run([*CLI, "segment", str(EXAMPLES), str(tmp_path / "out"), "--layout", "nikon"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "'nikon'" in p.stderr and "imagexpress" in p.stderr
    assert not (tmp_path / "out").exists()


def test_an_imagexpress_time_lapse_segments_its_phase_channel(tmp_path, ray_local):
    """End to end: TimePoint folders become timepoints, --channel 1 the phase wavelength; each plane is the
    phase field's own segmentation (the other wavelength never read)."""
    files, _, _ = CASES["imagexpress"]
    out = tmp_path / "out"
    s = pipeline.run(SegmentConfig(source=str(_plate(tmp_path, files)), out=str(out), layout="imagexpress",
                                   channel="1", compact=False))
    assert s.fields_done == 3 and s.fields_failed == 0
    o = store.Outputs(str(out))
    fields = o.read_table("fields")
    assert sorted(zip(fields["plate"], fields["well"], fields["site"], fields["t_index"])) == [
        ("Screen1", "B2", "0", 0), ("Screen1", "B2", "0", 1), ("val-screen", "B2", "0", 0)]  # path-safe plate name
    planes = [store.read_labels(o, f.plate, f.zarr_path.split(".zarr/", 1)[1], int(f.t_index))
              for f in fields.itertuples()]
    for lab in planes[1:]:
        np.testing.assert_array_equal(lab, planes[0])  # all three are the same phase field
