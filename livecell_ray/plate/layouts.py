"""Instrument naming presets: each instrument's export file names as a regex the manifest understands.

``segment --layout NAME`` stands for ``--pattern`` with the preset's regex. Named groups: plate, well (or
row + column), field, timepoint (hours) or day/hour/minute (elapsed) or year/month/mday/hour/minute (a
calendar time, read as hours since 2000-01-01), t (a timepoint index), channel (one file a channel:
``--channel`` picks the phase one), cell_type, crop. Where each convention is documented is in
``tests/test_layouts.py`` beside a file named exactly so, and in docs/plates.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from livecell_ray.config import LIVECELL_PATTERN


@dataclass(frozen=True)
class Layout:
    """One instrument's export names: the regex, and an example for error messages and docs."""

    pattern: str
    example: str


LAYOUTS: dict[str, Layout] = {
    "livecell": Layout(LIVECELL_PATTERN, "A172_Phase_A7_1_00d00h00m_1.tif"),
    # Incucyte image export: <experiment>_<well>_<field>_<YYYY>y<MM>m<DD>d_<hh>h<mm>m.tif
    "incucyte": Layout(r"(?P<plate>.+?)_(?P<well>[A-Pa-p]\d{1,2})_(?P<field>\d+)_(?P<year>\d{4})y(?P<month>\d{2})m"
                       r"(?P<mday>\d{2})d_(?P<hour>\d{2})h(?P<minute>\d{2})m",
                       "VID1234_B3_1_2024y03m05d_14h30m.tif"),
    # MetaXpress (ImageXpress): <plate>_<well>_s<site>_w<wavelength>[<GUID>].tif, time-lapse in TimePoint_<n>/
    "imagexpress": Layout(r"(?:TimePoint_(?P<t>\d+)/)?(?:(?P<plate>[^/]+?)_)?(?P<well>[A-Pa-p]\d{2})_s(?P<field>\d+)"
                          r"_w(?P<channel>\d)(?:[0-9A-Fa-f-]{36})?",
                          "TimePoint_1/Screen1_B02_s1_w1.tif"),
    # Harmony (Opera, Operetta): r<row>c<col>f<field>p<plane>-ch<channel>sk<timepoint>fk<n>fl<n>.tiff
    "operetta": Layout(r"r(?P<row>\d{2})c(?P<column>\d{2})f(?P<field>\d{2,3})p(?P<plane>\d{2})-ch(?P<channel>\d+)"
                       r"sk(?P<t>\d+)fk\d+fl\d+",
                       "r02c03f01p01-ch1sk1fk1fl1.tiff"),
    # HCS Studio (CellInsight CX5/CX7, ArrayScan): <prefix>_<plate>_<well>f<field>d<channel>.TIF
    "cellinsight": Layout(r"(?:.*_)?(?P<plate>[^_]+)_(?P<well>[A-Pa-p]\d{2})f(?P<field>\d{2})d(?P<channel>\d)",
                          "MFGTMP_140206180002_A01f00d0.TIF"),
    # Gen5 (Cytation): <well>_<read step>_<channel #>_<site>_<channel name>_<image #>.tif
    "cytation": Layout(r"(?P<well>[A-Pa-p]\d{1,2})_(?P<read>\d{2})_(?P<channel_index>\d)_(?P<field>\d+)_"
                       r"(?P<channel>[A-Za-z0-9 ]+)_(?P<t>\d{3})",
                       "B5_03_1_1_Bright Field_001.tif"),
    # CellVoyager (CV7000/CV8000/CQ1 plate mode): <plate>_<well>_T<t>F<field>L<l>A<a>Z<z>C<channel>.tif
    "cellvoyager": Layout(r"(?P<plate>.+)_(?P<well>[A-Pa-p]\d{2})_T(?P<t>\d{4})F(?P<field>\d{3})L\d{2}A\d{2}"
                          r"Z(?P<plane>\d{2})C(?P<channel>\d{2})",
                          "AssayPlate_Greiner_#655090_C02_T0001F001L01A01Z01C01.tif"),
}


class LayoutError(ValueError):
    """A preset name that is not one of LAYOUTS."""


def pattern_for(layout: str | None, pattern: str) -> str:
    """The regex a run uses: the preset's when one is named, else ``pattern``."""
    if layout is None:
        return pattern
    if layout not in LAYOUTS:
        raise LayoutError(f"--layout {layout!r}: unknown; one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout].pattern
