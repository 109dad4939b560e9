"""Plate maps: what was in each well (compound, dose, cell line, controls), checked and kept beside the results.

A plate map is a CSV or Parquet file with a ``well`` column, an optional ``plate`` column (without it
one map describes every plate), and any others: ``compound``, ``dose``, ``unit``, ``cell_line``,
``treatment``, ``control`` are understood by the growth and dose-response analyses, the rest are
carried along. It is validated whole before anything is written, then copied to
``OUT/platemap.parquet`` so later queries need not be given it again; a new map replaces it, and
``run.json`` records which file it came from.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from livecell_ray.plate.manifest import ManifestError, parse_well, plate_grid, row_index

#: Where the map's copy lives under OUT, and the run.json key that says where it came from.
PLATEMAP_FILE = "platemap.parquet"
RUN_KEY = "platemap"
#: Standard plate formats (rows, columns); a plate's format is the one its map declares (column
#: ``plate_format``: 6, 12, 24, 48, 96, 384 or 1536), else the smallest that holds every imaged well.
FORMATS = {6: (2, 3), 12: (3, 4), 24: (4, 6), 48: (6, 8), 96: (8, 12), 384: (16, 24), 1536: (32, 48)}
#: ``control`` values meaning a negative (vehicle, untreated: 100%) and a positive (full effect: 0%) control.
NEGATIVE = {"negative", "neg", "vehicle", "dmso", "untreated", "true", "yes", "1"}
POSITIVE = {"positive", "pos", "kill", "max"}
#: The columns the analyses read; a header matches without case, spaces or dashes ("Well", "Cell Line").
KNOWN = ("plate", "well", "compound", "dose", "unit", "cell_line", "treatment", "control", "plate_format")


class PlateMapError(ValueError):
    """A plate map that cannot be used; the message names the file, the row and the reason."""


def read(path: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Read and validate a plate map (CSV or Parquet through fsspec); wells normalised to 'A1' form."""
    import fsspec

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise PlateMapError(f"{path}: no such plate map") from exc
    try:
        if path.lower().endswith(".parquet"):
            df = pd.read_parquet(io.BytesIO(data))
        else:
            sep = _separator(data)
            df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, sep=sep, encoding="utf-8-sig")
            if sep == ";" and "dose" in [_header(c) for c in df.columns]:  # Excel's CSV where 0,5 is a half
                col = next(c for c in df.columns if _header(c) == "dose")
                df[col] = df[col].str.replace(",", ".", regex=False)
    except Exception as exc:
        raise PlateMapError(f"{path}: not a readable CSV or Parquet file ({type(exc).__name__}: {exc})") from exc
    return validate(df, path)


def _separator(data: bytes) -> str:
    """The CSV's field separator, read off its header line: ',' unless the header has none and has ';' (Excel's
    CSV in locales whose decimal mark is a comma) or tabs."""
    head = data.split(b"\n", 1)[0]
    if b"," in head:
        return ","
    return ";" if b";" in head else "\t" if b"\t" in head else ","


def _header(name: Any) -> str:
    """A header as KNOWN names it, where it is one of them ("Cell Line" -> "cell_line"); else as it is."""
    s = str(name).strip().lstrip("\ufeff")
    key = s.lower().replace(" ", "_").replace("-", "_")
    return key if key in KNOWN else s


def _line(i: int, path: str) -> str:
    """How a row is named in errors: the CSV line number (header is line 1), or the Parquet row index."""
    return f"row {i}" if path.lower().endswith(".parquet") else f"line {i + 2}"


def validate(df: pd.DataFrame, path: str) -> pd.DataFrame:
    """The map with wells normalised, dose numeric, empty strings as missing; PlateMapError otherwise."""
    df = df.reset_index(drop=True)
    df.columns = [_header(c) for c in df.columns]
    if "well" not in df.columns:
        raise PlateMapError(f"{path}: no 'well' column (columns: {', '.join(df.columns) or 'none'})")
    if df.empty:
        raise PlateMapError(f"{path}: the plate map has no rows")
    for c in df.columns:
        if df[c].dtype == object or pd.api.types.is_string_dtype(df[c]):
            df[c] = df[c].map(lambda v: v.strip() if isinstance(v, str) else v).replace("", np.nan)
    wells = []
    for i, w in enumerate(df["well"]):
        try:
            r, c = parse_well(str(w))
        except ManifestError as exc:
            raise PlateMapError(f"{path}: {_line(i, path)}: {exc}") from None
        wells.append(f"{r}{c}")
    df["well"] = wells
    if "plate" in df.columns:
        if df["plate"].isna().any():
            i = int(np.flatnonzero(df["plate"].isna().to_numpy())[0])
            raise PlateMapError(f"{path}: {_line(i, path)}: empty plate (give every row a plate, or drop the column)")
        df["plate"] = df["plate"].astype(str)
    keys = ["plate", "well"] if "plate" in df.columns else ["well"]
    dup = df.duplicated(keys, keep="first").to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((df[keys] == df[keys].iloc[i]).all(axis=1).to_numpy())[0])
        raise PlateMapError(f"{path}: {_line(i, path)}: well {df['well'].iloc[i]} appears twice "
                            f"(first at {_line(first, path)})")
    if "plate_format" in df.columns:
        for i, v in enumerate(df["plate_format"]):
            if pd.notna(v) and _number(v) not in FORMATS:
                raise PlateMapError(f"{path}: {_line(i, path)}: plate_format {v!r} is not one of "
                                    f"{', '.join(map(str, FORMATS))}")
        df["plate_format"] = pd.array([None if pd.isna(v) else int(_number(v)) for v in df["plate_format"]],
                                      dtype="Int64")
    if "dose" in df.columns:
        doses = []
        for i, v in enumerate(df["dose"]):
            d = _number(v)
            if d is None and pd.notna(v):
                raise PlateMapError(f"{path}: {_line(i, path)}: dose {v!r} is not a number "
                                    f"(give the unit in a 'unit' column)")
            if d is not None and d < 0:
                raise PlateMapError(f"{path}: {_line(i, path)}: dose {v!r} is negative")
            doses.append(np.nan if d is None else d)
        df["dose"] = np.asarray(doses, dtype=float)
    if "unit" in df.columns and "compound" in df.columns:
        for compound, g in df.dropna(subset=["compound"]).groupby("compound", sort=False):
            units = g["unit"].dropna()
            if units.nunique() > 1:
                i = int(units.index[units != units.iloc[0]][0])
                raise PlateMapError(f"{path}: {_line(i, path)}: unit {units.loc[i]!r} for {compound} differs from "
                                    f"{units.iloc[0]!r} in its earlier rows (one unit per compound)")
    return df.reset_index(drop=True)


def _number(v: Any) -> float | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def check_wells(df: pd.DataFrame, imaged: pd.DataFrame, path: str) -> None:
    """Every map well exists on its plate's format (the declared one, else the smallest holding the imaged wells).

    ``imaged``: the plate and well of every imaged field (the manifest, or the fields table).
    """
    plates = sorted(imaged["plate"].astype(str).unique()) if len(imaged) else []
    for i, row in df.iterrows():
        targets = [str(row["plate"])] if "plate" in df.columns else plates
        for plate in targets:
            wells = imaged.loc[imaged["plate"].astype(str) == plate, "well"]
            nr, nc = plate_format(wells, row.get("plate_format"))
            r, c = parse_well(row["well"])
            if row_index(r) >= nr or c > nc:
                raise PlateMapError(f"{path}: {_line(int(i), path)}: well {row['well']} does not exist on "
                                    f"{plate}'s {nr * nc}-well format ({nr} rows x {nc} columns)")


def plate_format(wells: Any, declared: Any = None) -> tuple[int, int]:
    """(rows, columns) of a plate: the declared format, else the smallest standard one holding these wells."""
    if declared is not None and not pd.isna(declared):
        return FORMATS[int(declared)]
    rc = [parse_well(str(w)) for w in wells]
    return plate_grid([r for r, _ in rc], [c for _, c in rc])


def save(outputs: Any, df: pd.DataFrame, source: str) -> dict[str, Any]:
    """Copy the validated map beside the results and record where it came from in run.json."""
    from livecell_ray import store

    data = store.parquet_bytes(pa.Table.from_pandas(df, preserve_index=False))
    outputs.write_bytes(store.join(outputs.root, PLATEMAP_FILE), data)
    record = {"source": source, "sha256": hashlib.sha256(data).hexdigest(), "rows": len(df),
              "columns": list(df.columns), "time": datetime.now(timezone.utc).isoformat()}
    run = outputs.read_run_or_empty()
    run[RUN_KEY] = record
    outputs.write_run(json.loads(json.dumps(run, default=str)))
    return record


def load(outputs: Any) -> pd.DataFrame | None:
    """The map kept beside the results, or None."""
    from livecell_ray import store

    path = store.join(outputs.root, PLATEMAP_FILE)
    if not outputs.fs.exists(path):
        return None
    return pd.read_parquet(io.BytesIO(outputs.fs.cat_file(path)))


def control_kind(value: Any) -> str | None:
    """'negative', 'positive' or None for a ``control`` cell."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    v = str(value).strip().lower()
    if v in NEGATIVE:
        return "negative"
    if v in POSITIVE:
        return "positive"
    return None


def mismatches(df: pd.DataFrame, imaged: pd.DataFrame) -> pd.DataFrame:
    """Wells in the map never imaged, and imaged wells the map does not describe (plate, well, issue)."""
    imaged = imaged[["plate", "well"]].astype(str).drop_duplicates()
    rows = []
    if "plate" in df.columns:
        mapped = set(zip(df["plate"].astype(str), df["well"]))
    else:
        mapped = {(p, w) for p in imaged["plate"].unique() for w in df["well"]}
    seen = set(zip(imaged["plate"], imaged["well"]))
    rows += [(p, w, "in the plate map, never imaged") for p, w in sorted(mapped - seen)]
    rows += [(p, w, "imaged, not in the plate map") for p, w in sorted(seen - mapped)]
    return pd.DataFrame(rows, columns=["plate", "well", "issue"])


def for_run(path: str, cfg: Any) -> tuple[pd.DataFrame, Any]:
    """A plate map read and checked whole against the wells ``cfg`` (a SegmentConfig) will image, before anything
    is written, and ``cfg`` with the map's ``cell_line`` column as its ``cell_lines``: the experimenter's word on
    each well's cells, which `--route auto` takes before the classifier. Both `segment --platemap` and a job
    spec's ``platemap`` come through here."""
    import dataclasses

    from livecell_ray.plate import manifest as manifest_mod

    pm = read(path, cfg.storage_options)
    fields = manifest_mod.build(cfg.source, cfg.pattern, cfg.manifest, cfg.storage_options, cfg.channel,
                                cfg.layout).fields
    check_wells(pm, fields[["plate", "well"]], path)
    if "cell_line" not in pm:
        return pm, cfg
    known = pm[pm["cell_line"].notna() & (pm["cell_line"].astype(str).str.strip() != "")]
    plates = known["plate"] if "plate" in known else [""] * len(known)
    return pm, dataclasses.replace(cfg, cell_lines=[(str(p) if p == p else "", str(w), str(c).strip())
                                                    for p, w, c in zip(plates, known["well"], known["cell_line"])])
