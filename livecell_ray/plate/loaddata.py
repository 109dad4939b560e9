"""CellProfiler's LoadData CSVs as manifests: the table CellProfiler itself reads a plate from (one row per image
set, ``FileName_<channel>`` and ``PathName_<channel>`` per channel, ``Metadata_*`` for plate, well, site and
time), so a plate already described for CellProfiler needs no other manifest."""

from __future__ import annotations

import pandas as pd

from livecell_ray.plate.manifest import ManifestError, row_name

#: CellProfiler LoadData's metadata columns (matched without case) -> the manifest's.
LOADDATA_METADATA = {"metadata_plate": "plate", "metadata_well": "well", "metadata_row": "row",
                     "metadata_col": "column", "metadata_column": "column", "metadata_site": "field",
                     "metadata_field": "field", "metadata_fieldid": "field", "metadata_timepoint_h": "timepoint",
                     "metadata_time_h": "timepoint", "metadata_timepoint": "timepoint", "metadata_time": "timepoint",
                     "metadata_celltype": "cell_type", "metadata_cell_type": "cell_type",
                     "metadata_cellline": "cell_type", "metadata_cell_line": "cell_type"}


def from_loaddata(df: pd.DataFrame, where: str, channel: str | None = None) -> pd.DataFrame:
    """A CellProfiler LoadData table (``FileName_<channel>``, ``PathName_<channel>``, ``Metadata_*``) as the
    manifest's columns: the phase channel's files (``channel``, or the only one), its metadata renamed
    (LOADDATA_METADATA; ``Metadata_Timepoint`` read as hours). A relative PathName is taken from ``where``'s
    folder, as CellProfiler takes it from the default input folder."""
    names = {c[len("FileName_"):]: c for c in df.columns if c.lower().startswith("filename_")}
    if not names:
        raise ManifestError(f"{where}: no FileName_<channel> column (a LoadData CSV) and no 'path' column")
    if channel is None and len(names) > 1:
        raise ManifestError(f"{where}: LoadData channels {', '.join(names)}: give --channel with the phase "
                            f"(or bright-field) one")
    pick = next((k for k in names if channel is None or k.lower() == str(channel).lower()), None)
    if pick is None:
        raise ManifestError(f"{where}: --channel {channel}: no FileName_{channel} column "
                            f"(channels: {', '.join(names)})")
    folder_col = next((c for c in df.columns if c.lower() == f"pathname_{pick.lower()}"), None)
    base = where.rsplit("/", 1)[0] if "/" in where else "."
    files = df[names[pick]].astype(str)
    if folder_col is None:
        folders = pd.Series([base] * len(df))
    else:
        folders = df[folder_col].fillna("").astype(str).map(
            lambda d: d if d.startswith("/") or "://" in d else f"{base}/{d}" if d else base)
    out = pd.DataFrame({"path": [f"{d.rstrip('/')}/{f}" for d, f in zip(folders, files)]})
    meta = {c.lower(): c for c in df.columns if c.lower().startswith("metadata_")}
    for key, col in LOADDATA_METADATA.items():
        if key in meta and col not in out:
            out[col] = df[meta[key]].to_numpy()
    if "well" not in out and {"row", "column"} <= set(out):
        out["well"] = [f"{r}{int(c)}" if not str(r).isdigit() else f"{row_name(int(r) - 1)}{int(c)}"
                       for r, c in zip(out["row"], out["column"])]
    if "plate" not in out:
        out["plate"] = "plate"
    return out.drop(columns=[c for c in ("row", "column") if c in out])
