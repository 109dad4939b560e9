"""``livecell-ray query``, ``sql`` and ``report``: what a finished OUT answers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from livecell_ray.cli._app import check_output_file, console, fail, out_console, parse_storage_options, query_error


def _emit(df: Any, fmt: str, output: str | None) -> None:
    """Print or save a table as table/csv/json/parquet."""
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
        t = Table(show_lines=False)
        for c in df.columns:
            t.add_column(str(c), justify="right" if df[c].dtype.kind in "iuf" else "left")
        for row in df.itertuples(index=False):
            t.add_row(*[_cell(v) for v in row])
        if output:
            fail("--output needs --format csv, json or parquet")
        out_console.print(t)
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


def _open(out: str, storage_options: str | None, platemap: str | None = None):
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
        return open_results(out, opts, platemap=platemap)
    except PlateMapError as exc:
        fail(str(exc))
    except (duckdb.Error, pa.ArrowException) as exc:
        fail(query_error(out, exc))


def query(
    out: str = typer.Argument(..., help="A run's output location"),
    what: str = typer.Argument("wells", help="wells, fields, cells, growth or dose_response"),
    metrics: str = typer.Option(",".join(("fields", "cells", "cells_per_field_mean", "cells_per_field_sd",
                                          "confluence", "area_median", "failed")),
                                help="Comma-separated well metrics"),
    by: str | None = typer.Option(None, help="'timepoint' for per well x timepoint rows"),
    where: str | None = typer.Option(None, help="SQL filter on fields, e.g. \"cell_type = 'A172'\""),
    well: str | None = typer.Option(None, help="Only this well (fields, cells)"),
    limit: int | None = typer.Option(None, min=1, help="At most N rows"),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or parquet"),
    output: str | None = typer.Option(None, help="Write to this file instead of stdout"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet: well[, plate], compound, dose, "
                                        "unit, control, ...), kept beside the results for later queries"),
    metric: str = typer.Option("cells_per_field_mean", help="dose_response: the per-well metric fitted "
                               "(a well metric, or growth_rate_per_h / doubling_time_h)"),
    at: float | None = typer.Option(None, help="dose_response: the timepoint (h) of a well metric "
                                    "(default: each well's last)"),
) -> None:
    """Per-well answers (cells per field, confluence, area, shape, intensity, growth, dose-response), or rows."""
    import duckdb

    res = _open(out, storage_options, platemap)
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
            if by not in (None, "timepoint"):
                fail("--by takes only 'timepoint'")
            df = res.wells([m.strip() for m in metrics.split(",") if m.strip()], by == "timepoint", where, well=well)
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
    _emit(df, fmt, output)
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
    _emit(df, fmt, output)


def report(
    out: str = typer.Argument(..., help="A run's output location"),
    html_path: str = typer.Option("report.html", "--html", help="Where to write the page"),
    storage_options: str | None = typer.Option(None),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet), kept beside the results"),
) -> None:
    """A self-contained HTML report: heatmaps, growth and dose-response curves, areas, overlays."""
    import duckdb
    import pyarrow as pa

    from livecell_ray.answers import report as report_mod

    check_output_file(html_path, "--html")
    _open(out, storage_options, platemap)
    try:
        path = report_mod.write(out, html_path, parse_storage_options(storage_options))
    except (duckdb.Error, pa.ArrowException) as exc:
        fail(query_error(out, exc))
    out_console.print(f"report: {Path(path).resolve()}")
