"""A plate (folder or object-store prefix) becomes a manifest: one row per field-timepoint image.

File names carry the metadata (LIVECell's convention by default, any regex with named groups
otherwise); an explicit CSV/Parquet manifest in CellProfiler LoadData style works too. Files that
match no pattern are returned as ``unmatched``, never dropped silently.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from livecell_ray.config import IMAGE_SUFFIXES, LIVECELL_PATTERN

COLUMNS = ["field_id", "path", "plate", "well", "row", "column", "field", "crop", "timepoint",
           "cell_type", "site", "t_index", "n_timepoints", "plane", "pixel_size", "timepoint_h", "acquired"]
#: Columns a manifest's rows carry before :func:`apply_layout` places them on their plate.
_PARSED = [c for c in COLUMNS if c not in ("field_id", "site", "t_index", "n_timepoints", "timepoint_h")]

_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


class ManifestError(ValueError):
    """The source cannot become a manifest (missing, empty, malformed); message names the cause."""


@dataclass
class Manifest:
    """Fields to segment, plus the files that did not match the naming pattern."""

    fields: pd.DataFrame
    unmatched: list[str] = field(default_factory=list)
    channel_from_names: bool = False  # the files are one a channel, and --channel chose among them by name

    def __len__(self) -> int:
        return len(self.fields)


def row_name(i: int) -> str:
    """0 -> 'A', 25 -> 'Z', 26 -> 'AA' (1536-well plates)."""
    return chr(65 + i) if i < 26 else "A" + chr(65 + i - 26)


def row_index(row: str) -> int:
    """'A' -> 0, 'Z' -> 25, 'AA' -> 26: the inverse of :func:`row_name`."""
    row = row.upper()
    return ord(row[0]) - 65 if len(row) == 1 else 26 + ord(row[1]) - 65


def plate_grid(rows: list[str], cols: list[int]) -> tuple[int, int]:
    """(rows, columns) of the smallest 96-, 384- or 1536-well plate holding these wells (else their extent)."""
    max_row = max((row_index(r) for r in rows), default=0) + 1
    max_col = max(cols, default=1)
    for nr, nc in ((8, 12), (16, 24), (32, 48)):
        if max_row <= nr and max_col <= nc:
            return nr, nc
    return max_row, max_col


def parse_well(well: str) -> tuple[str, int]:
    """'A7' -> ('A', 7); 'b03' -> ('B', 3). Rows A-Z then AA-AF (1536-well plates)."""
    m = _WELL.match(well.strip())
    if not m:
        raise ManifestError(f"cannot parse well name {well!r} (expected a row letter and a column number)")
    return m.group(1).upper(), int(m.group(2))


def parse_name(name: str, pattern: str | re.Pattern[str] = LIVECELL_PATTERN) -> dict[str, Any] | None:
    """Metadata from one file name, or None when it does not match.

    Named groups understood: plate, cell_type, well (or row + column), field, crop, timepoint
    (hours) or day/hour/minute. Plate falls back to cell type, then to 'plate'.
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    parts = name.split("/")
    m = None
    # A pattern with folders in it (ImageXpress' TimePoint_<n>/) matches the path's last components.
    for k in range(min(len(parts), rx.pattern.count("/") + 1), 0, -1):
        stem = "/".join(parts[-k:])
        base = stem.rsplit(".", 1)[0] if "." in parts[-1] else stem
        base = base[:-4] if base.lower().endswith(".ome") else base  # name.ome.tif: an OME-TIFF
        m = rx.fullmatch(base) or rx.fullmatch(stem)
        if m:
            break
    if not m:
        return None
    g = {k: v for k, v in m.groupdict().items() if v is not None}
    if "well" in g:
        row, col = parse_well(g["well"])
    elif "row" in g and "column" in g:
        # Rows as letters (B) or as numbers counted from 1 (02, as Operetta and CellInsight name them).
        row = row_name(int(g["row"]) - 1) if g["row"].isdigit() else g["row"].upper()
        row, col = parse_well(f"{row}{int(g['column'])}")
    else:
        return None
    acquired = ""
    if "timepoint" in g:
        t = float(g["timepoint"])
    elif "year" in g:  # a calendar time (Incucyte exports): hours since 2000-01-01, stable across runs
        from datetime import datetime

        when = datetime(int(g["year"]), int(g["month"]), int(g["mday"]), int(g.get("hour", 0)), int(g.get("minute", 0)))
        t = (when - datetime(2000, 1, 1)).total_seconds() / 3600
        acquired = when.isoformat(timespec="minutes")  # the instrument's clock, as the name gives it
    elif "t" in g and not ({"day", "hour", "minute"} & g.keys()):  # a timepoint index (Harmony, CellVoyager)
        t = float(int(g["t"]))
    else:
        t = int(g.get("day", 0)) * 24 + int(g.get("hour", 0)) + int(g.get("minute", 0)) / 60
    cell_type = g.get("cell_type", "")
    return {
        "plate": g.get("plate") or cell_type or "plate",
        "well": f"{row}{col}",
        "row": row,
        "column": col,
        "field": str(int(g["field"])) if g.get("field", "").isdigit() else g.get("field", "1"),
        "crop": int(g.get("crop", 0)),
        "timepoint": round(t, 4),
        "cell_type": cell_type,
        **({"acquired": acquired} if acquired else {}),
        **({"channel": g["channel"]} if "channel" in g else {}),
    }


def field_id(plate: str, well: str, field: str, crop: int, timepoint: float) -> str:
    """Stable id of one field-timepoint: same metadata, same id, on every run and machine."""
    key = f"{plate}|{well}|{field}|{crop}|{timepoint:.4f}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """Add ids, NGFF site names and time indices; reject duplicates."""
    df = df.copy()
    if "plane" not in df:
        df["plane"] = -1  # the whole file is the field (-1), or this plane of a stack (--stack-axis t)
    if "pixel_size" not in df:
        df["pixel_size"] = np.nan  # um/px given for this field (a manifest column); NaN: --pixel-size or the file's
    if "acquired" not in df:
        df["acquired"] = ""  # the acquisition's date and time, where the names carry one
    df["acquired"] = df["acquired"].fillna("").astype(str)
    df["plane"] = df["plane"].fillna(-1).astype(int)
    df["pixel_size"] = df["pixel_size"].astype(float)
    df["well"] = [f"{r}{c}" for r, c in zip(df["row"], df["column"])]
    df["field_id"] = [field_id(p, w, f, c, t) for p, w, f, c, t in
                      zip(df["plate"], df["well"], df["field"], df["crop"], df["timepoint"])]
    dup = df[df.duplicated("field_id", keep=False)]
    if len(dup):
        a, b = dup["path"].iloc[0], dup["path"].iloc[1]
        raise ManifestError(f"{a} and {b} describe the same plate/well/field/timepoint")
    df, _ = apply_layout(df, {})
    return df


def apply_layout(fields: pd.DataFrame, known: dict[str, dict[str, Any]]
                 ) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """NGFF site names and time indices, keeping every one that OUT already uses.

    ``known`` maps a plate to its layout from an earlier run: ``timepoints`` (hours; position = t index)
    and ``sites`` (well -> "field|crop" -> site name), and ``origin_h``: the plate's first scan, from which
    ``timepoint_h`` counts elapsed hours (fixed once written, so a plate that grows keeps its clock; an
    image older than the first run's first scan gets a negative ``timepoint_h``). Series and timepoints
    already there keep their place; new series take the next site numbers in each well (in natural order
    of field, then crop), new timepoints the next t indices (in time order). So a plate that grows between runs (new
    timepoints every few hours, a field added) never moves or overwrites what was written. The time
    axis is the plate's: ``n_timepoints`` is its whole length, so every image of a plate has the same
    (t, y, x) shape, as NGFF plate viewers expect (a field not imaged at some timepoint keeps empty
    planes there). Returns the fields and the layouts.
    """
    parts, layouts = [], {}
    for plate, g in fields.groupby("plate", sort=False):
        lay = known.get(str(plate)) or {}
        times = [float(t) for t in lay.get("timepoints", [])]
        times += sorted(set(g["timepoint"].astype(float)) - set(times))
        origin = float(lay.get("origin_h", min(times)))
        sites = {str(w): dict(s) for w, s in lay.get("sites", {}).items()}
        series = g[["well", "field", "crop"]].drop_duplicates()
        series = series.sort_values(["well", "field", "crop"],
                                    key=lambda c: c.map(_natural) if c.name == "field" else c)
        for w, f, c in zip(series["well"], series["field"], series["crop"]):
            in_well = sites.setdefault(str(w), {})
            key = f"{f}|{int(c)}"
            if key not in in_well:
                in_well[key] = str(max((int(v) for v in in_well.values()), default=-1) + 1)
        t_index = {t: i for i, t in enumerate(times)}
        parts.append(g.assign(
            site=[sites[str(w)][f"{f}|{int(c)}"] for w, f, c in zip(g["well"], g["field"], g["crop"])],
            t_index=[t_index[float(t)] for t in g["timepoint"]], n_timepoints=len(times),
            timepoint_h=(g["timepoint"].astype(float) - origin).round(4)))
        layouts[str(plate)] = {"timepoints": times, "sites": sites, "origin_h": origin}
    df = pd.concat(parts) if parts else fields.assign(site=[], t_index=[], n_timepoints=[], timepoint_h=[])
    df = df.sort_values(["plate", "row", "column", "site", "t_index"],
                        key=lambda c: c.astype(int) if c.name == "site" else c).reset_index(drop=True)
    return df[COLUMNS], layouts


def _natural(v: Any) -> Any:
    s = str(v)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _local_files(root: str) -> list[str]:
    """Every file under a local folder, symlinked sub-folders followed (a plate assembled from links is common),
    each real folder once: a link back up the tree is not walked round again."""
    seen: set[str] = set()
    out = []
    for folder, subs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subs[:] = []
            continue
        seen.add(real)
        out += [os.path.join(folder, n) for n in names]
    return out


def scan(source: str, pattern: str = LIVECELL_PATTERN, storage_options: dict[str, Any] | None = None,
         channel: str | None = None, example: str | None = None) -> Manifest:
    """List images under an fsspec URL (recursively) and parse their names.

    Files named one a channel (a ``channel`` group) are narrowed to ``channel``, the phase one; without it
    a plate of several channels is refused rather than segmented channel by channel. ``example`` is a
    layout preset's file name, shown when nothing matches.
    """
    if not _has_protocol(source):
        source = os.path.abspath(source)
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    try:
        if not fs.exists(root):
            raise ManifestError(f"{source}: source does not exist")
        if not fs.isdir(root):
            raise ManifestError(f"{source}: source is not a folder (give a folder/prefix or --manifest)")
        files = sorted(_local_files(root) if not _has_protocol(source) else fs.find(root))
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(f"{source}: cannot list ({type(exc).__name__}: {exc})") from exc
    images = [p for p in files if p.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise ManifestError(f"{source}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    rx = re.compile(pattern)
    rows, unmatched = [], []
    for p in images:
        url = fs.unstrip_protocol(p) if _has_protocol(source) else p
        meta = parse_name(p, rx)
        if meta is None:
            unmatched.append(url)
        else:
            rows.append({"path": url, **meta})
    if not rows:
        if example:
            raise ManifestError(f"{source}: {len(images)} images but none is named as the layout expects, e.g. "
                                f"{example} (first: {images[0].rsplit('/', 1)[-1]}); give --pattern or --manifest")
        raise ManifestError(f"{source}: {len(images)} images but none matches the file-name pattern "
                            f"(first: {images[0].rsplit('/', 1)[-1]}); give --pattern or --manifest")
    by_name = "channel" in rows[0]
    if by_name:
        rows = _phase_channel(rows, channel, source)
    df = pd.DataFrame(rows).drop(columns=["channel"], errors="ignore")
    return Manifest(_finish(df), unmatched, channel_from_names=by_name and channel is not None)


def _same_channel(a: str, b: str) -> bool:
    a, b = a.strip(), b.strip()
    return a.lower() == b.lower() or (a.isdigit() and b.isdigit() and int(a) == int(b))


def _phase_channel(rows: list[dict[str, Any]], channel: str | None, source: str) -> list[dict[str, Any]]:
    """The files of the phase channel, when a plate's files are one a channel."""
    found = sorted({str(r["channel"]) for r in rows}, key=_natural)
    if channel is None:
        if len(found) > 1:
            raise ManifestError(f"{source}: files of {len(found)} channels ({', '.join(found)}); give --channel "
                                f"with the phase (or bright-field) one")
        return rows
    keep = [r for r in rows if _same_channel(str(r["channel"]), channel)]
    if not keep:
        raise ManifestError(f"{source}: --channel {channel}: no file of that channel (channels: {', '.join(found)})")
    return keep


def _has_protocol(url: str) -> bool:
    return "://" in url


def load(manifest_url: str, storage_options: dict[str, Any] | None = None, channel: str | None = None) -> Manifest:
    """An explicit CSV or Parquet manifest: columns path, plate, well, field, timepoint (cell_type); or a
    CellProfiler LoadData CSV (:func:`livecell_ray.plate.loaddata.from_loaddata`)."""
    try:
        with fsspec.open(manifest_url, "rb", **(storage_options or {})) as f:
            df = pd.read_parquet(f) if manifest_url.endswith(".parquet") else pd.read_csv(f)
    except FileNotFoundError as exc:
        raise ManifestError(f"{manifest_url}: manifest not found") from exc
    except Exception as exc:
        raise ManifestError(f"{manifest_url}: cannot read manifest ({type(exc).__name__}: {exc})") from exc
    loaddata = "path" not in df.columns and any(c.lower().startswith("filename_") for c in df.columns)
    if loaddata:
        from livecell_ray.plate.loaddata import from_loaddata

        df = from_loaddata(df, manifest_url, channel)
    missing = {"path", "plate", "well"} - set(df.columns)
    if missing:
        raise ManifestError(f"{manifest_url}: manifest lacks column(s) {', '.join(sorted(missing))}")
    if df.empty:
        raise ManifestError(f"{manifest_url}: manifest has no rows")
    wells = [parse_well(str(w)) for w in df["well"]]
    df = df.assign(
        row=[r for r, _ in wells], column=[c for _, c in wells],
        field=df.get("field", pd.Series(["1"] * len(df))).astype(str),
        crop=df.get("crop", pd.Series([0] * len(df))).fillna(0).astype(int),
        timepoint=df.get("timepoint", pd.Series([0.0] * len(df))).astype(float),
        cell_type=df.get("cell_type", pd.Series([""] * len(df))).fillna("").astype(str),
        plate=df["plate"].astype(str), path=df["path"].astype(str),
    )
    # A LoadData channel column names the files: --channel chose them, it picks no plane inside them.
    return Manifest(_finish(df), channel_from_names=loaddata and channel is not None)


def expand_stacks(man: Manifest, interval_h: float | None, storage_options: dict[str, Any] | None = None
                  ) -> Manifest:
    """--stack-axis t: each plane of each time-lapse TIFF becomes its own field-timepoint, ``interval_h`` apart
    (from the file's OME TimeIncrement when not given). Reads each file's header only (tifffile)."""
    import tifffile

    from livecell_ray.plate.imaging import tiff_info, time_axis

    rows = []
    for r in man.fields.to_dict("records"):
        path = r["path"]
        try:
            with fsspec.open(path, "rb", **(storage_options or {})) as f, tifffile.TiffFile(f) as tif:
                info = tiff_info(tif)
        except Exception as exc:
            raise ManifestError(f"{path}: --stack-axis t: cannot read it as a TIFF stack "
                                f"({type(exc).__name__}: {exc})") from exc
        axes, shape, step = info.axes, info.shape, interval_h or info.interval_h
        extra = [i for i, (a, n) in enumerate(zip(axes, shape)) if a not in "YX" and n > 1]
        ax = time_axis(axes, extra)
        if ax is None:
            raise ManifestError(f"{path}: --stack-axis t does not fit the file: {axes} {shape} has "
                                f"{'no plane axis' if not extra else 'no single time axis'}")
        if not step or step <= 0:
            raise ManifestError(f"{path}: --stack-axis t needs --interval HOURS (the file does not say its own)")
        rows += [{**r, "plane": k, "timepoint": round(float(r["timepoint"]) + k * step, 4)} for k in range(shape[ax])]
    return Manifest(_finish(pd.DataFrame(rows)[_PARSED]), man.unmatched)


def build(source: str, pattern: str = LIVECELL_PATTERN, manifest: str | None = None,
          storage_options: dict[str, Any] | None = None, channel: str | None = None,
          layout: str | None = None) -> Manifest:
    """The manifest for a run: an explicit manifest file wins over scanning the source; ``layout`` names an
    instrument's naming preset (livecell_ray.plate.layouts), which stands for ``pattern``."""
    if manifest:
        return check_names(load(manifest, storage_options, channel), manifest)
    from livecell_ray.plate import layouts

    try:
        rx = layouts.pattern_for(layout, pattern)
    except layouts.LayoutError as exc:
        raise ManifestError(str(exc)) from None
    return check_names(scan(source, rx, storage_options, channel, layouts.LAYOUTS[layout].example if layout else None),
                       source)


def check_names(man: Manifest, where: str) -> Manifest:
    """Refuse plates whose names differ only in characters a path cannot hold (``Plate 1``, ``Plate-1``,
    ``Plate/1``): stored under one sanitised name, one's masks would overwrite the other's."""
    from livecell_ray.store import safe

    groups: dict[str, set[str]] = {}
    for name in man.fields["plate"].astype(str).unique():
        groups.setdefault(safe(name), set()).add(name)
    clash = {k: sorted(v) for k, v in groups.items() if len(v) > 1}
    if clash:
        k, names = next(iter(sorted(clash.items())))
        raise ManifestError(f"{where}: plates {', '.join(repr(n) for n in names)} would all be stored as {k!r} "
                            f"(names differ only in characters outside A-Z a-z 0-9 . _ -); rename them apart")
    return man
