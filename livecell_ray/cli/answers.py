"""``livecell-ray query``, ``sql`` and ``report``: what a finished OUT answers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from livecell_ray.cli._app import check_output_file, console, fail, out_console, parse_storage_options, query_error

#: The columns a terminal shows first, per table (the rest follow in the table's order while they fit).
FIRST = ("plate", "well", "timepoint_h", "site", "label", "n_cells", "cells_per_field_mean", "confluence_pct",
         "area_um2_median", "area_px_median", "area_um2", "area_px", "eccentricity", "solidity", "mean_intensity",
         "confluence", "cells", "fields", "failed", "doubling_time_h", "growth_rate_per_h", "reason", "cell_type",
         "status", "stage", "error")


def _fit(df: Any, width: int) -> tuple[Any, list[str]]:
    """The columns of ``df`` that fit a terminal ``width`` wide, whole (headers never cut): those of FIRST
    first, then the others in order, columns with no value in any row left out; returns the narrowed frame
    and the names left out."""
    shown, used = [], 4
    for c in [c for c in FIRST if c in df.columns] + [c for c in df.columns if c not in FIRST]:
        values = [_cell(v) for v in df[c].head(200)]
        if not any(values):
            continue
        need = max([len(str(c)), *map(len, values)]) + 3
        if shown and used + need > width:
            continue
        shown.append(c)
        used += need
    return df[shown], [c for c in df.columns if c not in shown]


def _emit(df: Any, fmt: str, output: str | None, all_columns: bool = False) -> None:
    """Print or save a table as table/csv/json/parquet (a table: the columns that fit, unless ``all_columns``)."""
    check_output_file(output, "--output")
    if fmt == "parquet":
        if not output:
            fail("--format parquet needs --output FILE")
        df.to_parquet(output, index=False)
        console.print(f"wrote {len(df)} rows to {output}")
        return
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = df.to_json(orient="records", indent=2)
    elif fmt == "table":
        if output:
            fail("--output needs --format csv, json or parquet")
        left: list[str] = []
        if not all_columns:
            df, left = _fit(df, out_console.width)
        t = Table(show_lines=False)
        for c in df.columns:
            t.add_column(str(c), justify="right" if df[c].dtype.kind in "iuf" else "left", no_wrap=True,
                         min_width=len(str(c)))
        for row in df.itertuples(index=False):
            t.add_row(*[_cell(v) for v in row])
        out_console.print(t)
        if left:  # on stderr: stdout holds the table alone
            console.print(f"{len(left)} more columns ({', '.join(left[:6])}{', ...' if len(left) > 6 else ''}): "
                          f"--all-columns, or --format csv", highlight=False)
        return
    else:
        fail(f"unknown --format {fmt!r}: use table, csv, json or parquet")
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


def _cell(v: Any) -> str:
    """A table cell: a value left empty (None, NaN, NaT) prints as nothing, not as 'nan' or 'None'."""
    import pandas as pd

    if v is None or (not isinstance(v, (str, bytes)) and pd.api.types.is_scalar(v) and pd.isna(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _open(out: str, storage_options: str | None, platemap: str | None = None, save_platemap: bool = False):
    import duckdb
    import pyarrow as pa

    from livecell_ray.answers.query import open_results
    from livecell_ray.plate.platemap import PlateMapError

    opts = parse_storage_options(storage_options)
    from livecell_ray import store

    o = store.Outputs(out, opts)
    if not o.fs.exists(store.join(o.root, "fields")) and not o.fs.exists(store.join(o.root, "run.json")):
        fail(f"{out}: no livecell-ray results here (no fields/ or run.json)")
    try:
        res = open_results(out, opts, platemap=platemap, save_platemap=save_platemap)
    except PlateMapError as exc:
        fail(str(exc))
    except (duckdb.Error, pa.ArrowException) as exc:
        fail(query_error(out, exc))
    if res.platemap_use == "this query only":
        console.print(f"plate map: {platemap} used for this query only; the one saved with the run is kept "
                      f"(--save-platemap replaces it)", highlight=False)
    return res


def query(
    out: str = typer.Argument(..., help="A run's output location"),
    what: str = typer.Argument("wells", help="wells, fields, cells, growth or dose_response"),
    metrics: str = typer.Option(",".join(("fields", "cells", "cells_per_field_mean", "confluence_pct",
                                          "area_px_median", "area_um2_median", "failed")),
                                help="Comma-separated well metrics (livecell-ray query OUT wells --metrics '' "
                                     "lists them)"),
    by: str = typer.Option("timepoint", help="wells: 'timepoint' (one row per well and timepoint, as the "
                           "wells view) or 'well' (every timepoint pooled)"),
    last: bool = typer.Option(False, "--last", help="wells: each well's last timepoint only"),
    where: str | None = typer.Option(None, help="SQL filter on fields, e.g. \"cell_type = 'A172'\""),
    well: str | None = typer.Option(None, help="Only this well (fields, cells)"),
    limit: int | None = typer.Option(None, min=1, help="At most N rows"),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or parquet"),
    output: str | None = typer.Option(None, help="Write to this file instead of stdout"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet: well[, plate], compound, dose, "
                                        "unit, control, ...), kept beside the results for later queries when "
                                        "none is (else used for this query only)"),
    save_platemap: bool = typer.Option(False, "--save-platemap", help="Replace the plate map saved with the run "
                                       "by --platemap's"),
    metric: str = typer.Option("cells_per_field_mean", help="dose_response: the per-well metric fitted "
                               "(a well metric, or growth_rate_per_h / doubling_time_h)"),
    at: float | None = typer.Option(None, help="dose_response: the timepoint of a well metric, in hours since "
                                    "the plate's first scan (default: each well's last)"),
    all_columns: bool = typer.Option(False, "--all-columns", help="table: every column, however wide"),
) -> None:
    """Per-well answers (cells per field, confluence, area, shape, intensity, growth, dose-response), or rows."""
    import duckdb

    res = _open(out, storage_options, platemap, save_platemap)
    if well:
        from livecell_ray.plate.manifest import ManifestError, parse_well

        try:  # A01, a1 and A1 are one well; stored as A1
            well = "".join(map(str, parse_well(well)))
        except ManifestError as exc:
            fail(f"--well: {exc}")
    try:
        if what == "growth":
            df = res.growth()
        elif what == "dose_response":
            df = res.dose_response(metric, at)
        elif what == "wells":
            if by not in ("timepoint", "well"):
                fail(f"--by {by!r}: use 'timepoint' (one row per well and timepoint) or 'well' (pooled)")
            if last and by == "well":
                fail("--last picks a timepoint: it goes with --by timepoint, not --by well")
            names = [m.strip() for m in metrics.split(",") if m.strip()]
            if not names:
                from livecell_ray.answers.query import WELL_METRICS

                fail(f"--metrics: give one or more of {', '.join(WELL_METRICS)}")
            df = res.wells(names, by == "timepoint", where, well=well, last=last)
            what_rows = ("one row per well and timepoint (hours since the plate's first scan)" if by == "timepoint"
                         and not last else "each well's last timepoint" if last else "every timepoint pooled")
            if fmt == "table":
                console.print(f"wells: {what_rows}", highlight=False)
        elif what in ("fields", "cells"):
            df = res.rows(what, where, well)
        else:
            fail(f"unknown table {what!r}: use wells, fields, cells, growth or dose_response")
    except ValueError as exc:
        fail(str(exc))
    except duckdb.Error as exc:
        fail(query_error(out, exc))
    if limit:
        df = df.head(limit)
    _emit(df, fmt, output, all_columns)
    issues = res.platemap_issues()
    if what in ("wells", "growth", "dose_response") and len(issues):
        # On stderr, so that CSV or JSON on stdout stays one table; never dropped silently.
        console.print(f"plate map vs imaged wells: {len(issues)} mismatches", highlight=False)
        for r in issues.itertuples(index=False):
            console.print(f"  {r.plate} {r.well}: {r.issue}", highlight=False)


def sql(
    out: str = typer.Argument(..., help="A run's output location"),
    statement: str = typer.Argument(..., help="DuckDB SQL over views cells, fields, wells, failures"),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or parquet"),
    output: str | None = typer.Option(None),
    storage_options: str | None = typer.Option(None),
    all_columns: bool = typer.Option(False, "--all-columns", help="table: every column, however wide"),
) -> None:
    """Any DuckDB SQL over the run's views."""
    import duckdb

    if not statement.strip():
        fail("empty SQL statement: give one, e.g. \"SELECT well, count(*) FROM cells GROUP BY well\"")
    res = _open(out, storage_options)
    try:
        df = res.df(statement)
    except duckdb.Error as exc:
        fail(query_error(out, exc))
    _emit(df, fmt, output, all_columns)


def report(
    out: str = typer.Argument(..., help="A run's output location"),
    html_path: str = typer.Option("report.html", "--html", help="Where to write the page"),
    storage_options: str | None = typer.Option(None),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet), kept beside the results when none is"),
    save_platemap: bool = typer.Option(False, "--save-platemap", help="Replace the saved plate map by --platemap's"),
) -> None:
    """A self-contained HTML report: heatmaps, growth and dose-response curves, areas, overlays."""
    import duckdb
    import pyarrow as pa

    from livecell_ray.answers import report as report_mod

    check_output_file(html_path, "--html")
    res = _open(out, storage_options, platemap, save_platemap)
    try:
        path = report_mod.write(out, html_path, parse_storage_options(storage_options), res)
    except (duckdb.Error, pa.ArrowException) as exc:
        fail(query_error(out, exc))
    out_console.print(f"report: {Path(path).resolve()}")


def export(
    out: str = typer.Argument(..., help="A run's output location"),
    path: str = typer.Argument(..., help="The file to write (.parquet, .csv; incucyte: .txt or .csv)"),
    kind: str = typer.Option("cytotable", "--as", help="cytotable (one row per cell, Metadata_* and Cells_* "
                             "columns, as pycytominer takes them) or incucyte (one metric: timepoints as rows, "
                             "wells as columns)"),
    metric: str = typer.Option("confluence_pct", help="incucyte: the well metric"),
    where: str | None = typer.Option(None, help="cytotable: SQL filter on cells"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
) -> None:
    """A run's tables in other tools' shapes: CytoTable/pycytominer per-cell profiles, or Incucyte's wide export."""
    import duckdb

    from livecell_ray.answers import export as export_mod

    if kind not in ("cytotable", "incucyte"):
        fail(f"--as {kind!r}: use cytotable or incucyte")
    check_output_file(path, "FILE")
    res = _open(out, storage_options)
    try:
        df = export_mod.cytotable(res, where) if kind == "cytotable" else export_mod.incucyte_wide(res, metric)
    except ValueError as exc:
        fail(str(exc))
    except duckdb.Error as exc:
        fail(query_error(out, exc))
    if path.endswith(".parquet"):
        df.to_parquet(path, index=False)
    elif path.endswith((".txt", ".tsv")):
        df.to_csv(path, sep="\t", index=False)
    else:
        df.to_csv(path, index=False)
    console.print(f"wrote {len(df)} rows, {len(df.columns)} columns to {path}", highlight=False)
