"""A run's tables in the shapes other tools already read: a CytoTable-style per-cell table for pycytominer,
and Incucyte's wide export of one metric (timepoints as rows, wells as columns).

CytoTable (the Cytomining project's converter of CellProfiler output) names metadata ``Metadata_*`` and
features ``<Compartment>_<Module>_<Measurement>``; pycytominer's ``aggregate``, ``normalize`` and
``feature_select`` take those with their defaults (``features="infer"`` reads the ``Cells_`` columns,
``strata=["Metadata_Plate", "Metadata_Well"]``). Incucyte's metric exports are tab-separated text with
``Date Time`` and ``Elapsed`` (hours) then one column per well.
"""

from __future__ import annotations

import pandas as pd

from livecell_ray.answers.query import ALIASES, TIME, Results

#: cells column -> CellProfiler's measurement name (Cells compartment; AreaShape in pixels as CellProfiler's).
CYTOTABLE_FEATURES = {
    "area_px": "Cells_AreaShape_Area",
    "perimeter_px": "Cells_AreaShape_Perimeter",
    "major_axis_px": "Cells_AreaShape_MajorAxisLength",
    "minor_axis_px": "Cells_AreaShape_MinorAxisLength",
    "eccentricity": "Cells_AreaShape_Eccentricity",
    "solidity": "Cells_AreaShape_Solidity",
    "mean_intensity": "Cells_Intensity_MeanIntensity_Phase",
    "std_intensity": "Cells_Intensity_StdIntensity_Phase",
    "centroid_x": "Cells_Location_Center_X",
    "centroid_y": "Cells_Location_Center_Y",
}
#: cells column -> its Metadata_ name.
CYTOTABLE_METADATA = {
    "plate": "Metadata_Plate", "well": "Metadata_Well", "site": "Metadata_Site", TIME: "Metadata_Timepoint_h",
    "cell_type": "Metadata_CellType", "field_id": "Metadata_FieldID", "label": "Metadata_ObjectNumber",
    "area_um2": "Metadata_Area_um2", "confidence": "Metadata_Confidence", "path": "Metadata_ImagePath",
}


def cytotable(res: Results, where: str | None = None) -> pd.DataFrame:
    """One row per cell, metadata first (``Metadata_*``; the plate map's columns as ``Metadata_<column>``),
    then the features (``Cells_*``). Location and area in pixels, as CellProfiler gives them; the cell's
    area in µm² is metadata (``Metadata_Area_um2``) so that a feature-wise normalisation never mixes it in."""
    cols = ", ".join(f'"{c}"' for c in [*CYTOTABLE_METADATA, *CYTOTABLE_FEATURES])
    df = res.df(f"SELECT {cols} FROM cells" + (f" WHERE {where}" if where else "")
                + f" ORDER BY plate, well, {TIME}, site, label")
    df = df.rename(columns={**CYTOTABLE_METADATA, **CYTOTABLE_FEATURES})
    if res.platemap is not None and len(df):
        pm = res.platemap.rename(columns={c: f"Metadata_{c[:1].upper()}{c[1:]}" for c in res.platemap.columns})
        keys = [k for k in ("Metadata_Plate", "Metadata_Well") if k in pm.columns]
        df = df.merge(pm, on=keys, how="left")
        meta = [c for c in df.columns if c.startswith("Metadata_")]
        df = df[meta + [c for c in df.columns if c not in meta]]
    return df


def incucyte_wide(res: Results, metric: str = "confluence_pct") -> pd.DataFrame:
    """One metric of the wells as Incucyte exports it: a row per timepoint (``Elapsed``: hours since the plate's
    first scan; ``Date Time`` where the names carry the acquisition time), a column per well (``plate well``
    when the run holds several plates)."""
    metric = ALIASES.get(metric, metric)
    per_time = res.wells([metric], with_map=False)
    if per_time.empty:
        return pd.DataFrame(columns=["Elapsed"])
    several = per_time["plate"].nunique() > 1
    per_time["column"] = [f"{p} {w}" if several else w for p, w in zip(per_time["plate"], per_time["well"])]
    order = per_time.drop_duplicates("column").sort_values(["plate", "well"],
                                                           key=lambda c: c.map(_well_key) if c.name == "well" else c)
    wide = per_time.pivot_table(index=TIME, columns="column", values=metric, aggfunc="first")
    wide = wide[list(order["column"])].reset_index().rename(columns={TIME: "Elapsed"})
    when = res.df(f"SELECT {TIME}, min(acquired) AS t FROM fields GROUP BY {TIME}")
    if when["t"].notna().any():
        stamps = dict(zip(when[TIME], when["t"]))
        wide.insert(0, "Date Time", [stamps.get(t) for t in wide["Elapsed"]])
    wide.columns.name = None
    return wide


def _well_key(well: str) -> tuple[int, str, int]:
    from livecell_ray.plate.manifest import parse_well

    r, c = parse_well(well)
    return len(r), r, c
