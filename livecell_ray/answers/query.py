"""Per-well answers from a run's Parquet tables, through DuckDB.

Views: ``cells`` (one row per cell), ``fields`` (one row per field-timepoint), ``failures`` and
``wells`` (per well and timepoint aggregates). Works on local paths and on object stores
(s3://, gs://...) through fsspec registered in DuckDB.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import duckdb
import numpy as np
import pandas as pd

from livecell_ray import store
from livecell_ray.answers import dose_response as dose_mod
from livecell_ray.answers import growth as growth_mod
from livecell_ray.plate import platemap as platemap_mod

#: per-well metrics over fields (one row per field-timepoint) ...
FIELD_METRICS: dict[str, str] = {
    # Fields (sites), not images: pooled, a field imaged 4 times is 1 (rows without a field name: each its own).
    "fields": "count(DISTINCT coalesce(field, field_id) || '|' || coalesce(crop, 0))",
    "images": "count(*)",
    "cells": "sum(n_cells)::BIGINT",
    "cells_per_field_mean": "avg(n_cells)",
    "cells_per_field_sd": "stddev_samp(n_cells)",
    "confluence_pct": "100 * avg(confluence)",  # as Incucyte shows it; the fields table's confluence is a fraction
}
#: ... and over the cells of those fields (um^2: NULL where the scale is unknown).
CELL_METRICS: dict[str, str] = {
    "area_px_median": "median(area_px)",
    "area_um2_median": "median(area_um2)",
    "area_px_mean": "avg(area_px)",
    "area_um2_mean": "avg(area_um2)",
    "eccentricity_mean": "avg(eccentricity)",
    "solidity_mean": "avg(solidity)",
    "intensity_mean": "avg(mean_intensity)",
}
WELL_METRICS: dict[str, str] = {**FIELD_METRICS, **CELL_METRICS, "failed": "failures per well"}
#: Names a user may type (and those of output format 0.2) for the metrics above.
ALIASES = {"count": "cells", "n_cells": "cells", "area": "area_px_median", "area_median": "area_px_median",
           "area_mean": "area_px_mean", "area_um2": "area_um2_median", "confluence": "confluence_pct",
           "eccentricity": "eccentricity_mean", "solidity": "solidity_mean", "intensity": "intensity_mean"}
#: The time key of per-timepoint rows: hours since the plate's first scan.
TIME = "timepoint_h"
#: DuckDB's words for a file that was listed but is gone when read.
_VANISHED = ("No files found that match", "No such file")
_REOPEN_TRIES = 4
T = TypeVar("T")
DEFAULT_METRICS = ("fields", "images", "cells", "cells_per_field_mean", "cells_per_field_sd", "confluence_pct",
                   "area_px_median", "area_um2_median", "area_px_mean", "area_um2_mean", "eccentricity_mean",
                   "solidity_mean", "intensity_mean", "failed")


class Results:
    """A run's outputs as DuckDB relations (``cells``, ``fields``, ``failures``, ``wells``).

    On an object store the tables' files are first copied to a temporary folder, all at once, when
    together they are at most ``copy_limit_mb``: DuckDB reads fsspec files one request after another
    (three a file), so a plate's few hundred files would cost seconds of round trips on every query.
    Larger tables are read where they are. The copy goes when this object does.
    """

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None, copy_limit_mb: float = 1024,
                 platemap: str | None = None, save_platemap: bool = False):
        self.outputs = store.Outputs(out, storage_options)
        self.platemap: pd.DataFrame | None = None
        self.copy_limit_mb = copy_limit_mb
        # DuckDB draws a progress bar on stdout for queries over 2 s, which would end up inside the
        # CSV or JSON that `livecell-ray query` writes there.
        self.con = duckdb.connect()
        self.con.execute("SET enable_progress_bar = false")
        self.copied = 0  # files read from a local copy
        self._with_files: set[str] = set()  # the tables that have files (the others are empty views)
        self._tmp: Any = None  # the finalizer of the current local copy
        self._retry(lambda: None, stale=True)
        #: What happened to a ``platemap`` given here: "saved", "this query only" (a map is saved already and
        #: ``save_platemap`` was not given: the saved one is never replaced silently), or None.
        self.platemap_use: str | None = None
        saved = platemap_mod.load(self.outputs)
        if platemap:  # validated against the imaged wells; kept beside the results when none is, or when asked
            pm = platemap_mod.read(platemap, storage_options)
            platemap_mod.check_wells(pm, self.imaged_wells(), platemap)
            if saved is None or save_platemap:
                platemap_mod.save(self.outputs, pm, platemap)
                saved, self.platemap_use = platemap_mod.load(self.outputs), "saved"
            else:
                saved, self.platemap_use = pm, "this query only"
        self.platemap = saved
        if self.platemap is not None:
            self.con.register("platemap", self.platemap)
            self._wells_view()

    def imaged_wells(self) -> pd.DataFrame:
        """Plate and well of every imaged well (one row each)."""
        return self.df("SELECT DISTINCT plate, well FROM fields ORDER BY plate, well")

    def with_platemap(self, df: pd.DataFrame) -> pd.DataFrame:
        """Per-well rows with the plate map's columns beside them (unchanged when there is no map)."""
        if self.platemap is None or df.empty:
            return df
        keys = ["plate", "well"] if "plate" in self.platemap.columns else ["well"]
        extra = self.platemap.drop(columns=[c for c in self.platemap.columns if c in df.columns and c not in keys])
        return df.merge(extra, on=keys, how="left")

    def platemap_issues(self) -> pd.DataFrame:
        """Wells in the map never imaged and imaged wells missing from it (empty without a map)."""
        if self.platemap is None:
            return pd.DataFrame(columns=["plate", "well", "issue"])
        return platemap_mod.mismatches(self.platemap, self.imaged_wells())

    def growth(self, cfg: growth_mod.GrowthConfig | None = None) -> pd.DataFrame:
        """Growth rate and doubling time per well (or the reason there is none), with the map's columns."""
        per_time = self.wells(["cells_per_field_mean"], with_map=False)
        return self.with_platemap(growth_mod.growth_table(per_time, cfg=cfg))

    def dose_response(self, metric: str = "cells_per_field_mean", at: float | None = None,
                      cfg: dose_mod.DoseConfig | None = None) -> pd.DataFrame:
        """IC50/EC50 per compound of a per-well metric: a well metric at timepoint ``at`` (default: each
        well's last), or ``growth_rate_per_h`` / ``doubling_time_h`` from :meth:`growth`."""
        if self.platemap is None:
            raise ValueError("dose-response needs a plate map: give --platemap FILE once")
        return dose_mod.dose_response_table(self.per_well(metric, at), metric, cfg)

    def per_well(self, metric: str, at: float | None = None) -> pd.DataFrame:
        """One value of a metric per well (with the map's columns), as dose-response fits it."""
        if metric in growth_mod.COLUMNS:
            return self.growth()
        metric = ALIASES.get(metric, metric)
        per_time = self.wells([metric], with_map=False)
        if at is not None:
            per_time = per_time[np.isclose(per_time[TIME], at)]
            if per_time.empty:
                raise ValueError(f"no well was imaged at {at:g} h (hours since the plate's first scan)")
        return self.with_platemap(last_timepoint(per_time))

    def _open(self) -> None:
        """List the committed files and (re)make the views over them."""
        c = self.outputs.committed()
        tables = {"cells": c.cells, "fields": c.fields, "failures": self.outputs.table_files("failures")}
        if not store.is_local(self.outputs.url):
            tables = self._local_copies(tables, self.copy_limit_mb, c.part_docs)
        self._with_files = {t for t, files in tables.items() if files}
        for table, files in tables.items():
            # Only committed rows, each once: per-field files and compacted parts (store.Committed).
            if files:
                rel = self.con.read_parquet(files, hive_partitioning=table != "failures", union_by_name=True)
                rel.create_view(f"_{table}_files", replace=True)
                # Columns a file lacks (one of an earlier output format, or written by another tool) as NULL,
                # so every query sees the documented columns.
                have = self._columns(f"_{table}_files")
                extra = "".join(f", NULL::{t} AS {c}" for c, t in _EMPTY_COLUMNS[table] if c not in have)
                self.con.execute(f"CREATE OR REPLACE VIEW _{table}_all AS SELECT *{extra} FROM _{table}_files")
                self.con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _{table}_all")
            else:
                self.con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM ({_EMPTY[table]}) WHERE false")
        self._elapsed_time()
        self._wells_view()

    def _elapsed_time(self) -> None:
        """``timepoint_h`` for rows written before output format 0.3 (which lack it): hours since the plate's
        first scan among its fields, what the pipeline now writes; rows that have it are read as they are."""
        if "fields" not in self._with_files or not self.con.execute(
                f"SELECT count(*) FROM fields WHERE {TIME} IS NULL").fetchone()[0]:
            return
        self.con.execute("CREATE OR REPLACE VIEW _origin AS SELECT plate, min(timepoint) AS o FROM _fields_all "
                         "GROUP BY plate")
        for table in ("fields", "cells") if "cells" in self._with_files else ("fields",):
            col = f"coalesce(t.{TIME}, round(t.timepoint - _origin.o, 4))"
            self.con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT t.* REPLACE ({col} AS {TIME}) "
                             f"FROM _{table}_all t LEFT JOIN _origin USING (plate)")

    def _columns(self, view: str) -> set[str]:
        return {r[0] for r in self.con.execute(f"DESCRIBE {view}").fetchall()}

    def _wells_view(self) -> None:
        """The ``wells`` view (per well and timepoint), joined with the plate map when there is one."""
        sql = wells_sql(DEFAULT_METRICS, by_timepoint=True)
        if self.platemap is not None:
            on = "w.plate = m.plate AND w.well = m.well" if "plate" in self.platemap.columns else "w.well = m.well"
            drop = ", ".join(f'"{c}"' for c in ("plate", "well") if c in self.platemap.columns)
            sql = f"SELECT w.*, m.* EXCLUDE ({drop}) FROM ({sql}) w LEFT JOIN platemap m ON {on}"
        self.con.execute(f"CREATE OR REPLACE VIEW wells AS {sql}")

    def _retry(self, run: Callable[[], T], stale: bool = False) -> T:
        """``run()``, listing the tables again (and first, when ``stale``) whenever a listed file has gone
        by the time it is read or copied: a compaction (`segment`'s at the end of a run, or `livecell-ray
        compact`) replaced it by a part that holds the same rows, so the new listing answers the same
        question."""
        for attempt in range(_REOPEN_TRIES):
            try:
                if stale:
                    self._open()
                return run()
            except (duckdb.IOException, FileNotFoundError) as exc:
                vanished = isinstance(exc, FileNotFoundError) or any(m in str(exc) for m in _VANISHED)
                if attempt == _REOPEN_TRIES - 1 or not vanished:
                    raise
                stale = True
        raise AssertionError("unreachable")

    def _local_copies(self, tables: dict[str, list[str]], limit_mb: float,
                      have: dict[str, bytes]) -> dict[str, list[str]]:
        """The tables' files, copied to a temporary folder when small enough (else their URLs); ``have``:
        files already read (the fields parts, read to tell which rows count)."""
        import os
        import shutil
        import tempfile
        import weakref

        fs, root = self.outputs.fs, self.outputs.root.rstrip("/")
        paths = [p for files in tables.values() for p in files]
        known = self.outputs.listed_sizes  # the listings' sizes; a HEAD only for a file they missed
        unknown = [p for p in paths if known.get(p) is None]
        size = sum(known[p] or 0 for p in paths if p not in unknown) + sum(fs.sizes(unknown) if unknown else [])
        if not paths or size > limit_mb * 2**20:
            self.con.register_filesystem(fs)
            prefix = self.outputs.url.split("://", 1)[0] + "://"
            return {t: [prefix + p for p in files] for t, files in tables.items()}
        tmp = tempfile.mkdtemp(prefix="livecell-ray-query-")
        if self._tmp is not None:  # a reopen: the previous copy goes now
            self._tmp()
        self._tmp = weakref.finalize(self, shutil.rmtree, tmp, True)
        local = {p: os.path.join(tmp, p[len(root) + 1:]) for p in paths}  # hive folders kept
        for d in {os.path.dirname(v) for v in local.values()}:
            os.makedirs(d, exist_ok=True)
        for p, doc in have.items():
            if p in local:
                with open(local[p], "wb") as f:
                    f.write(doc)
        fetch = [p for p in local if p not in have]
        if fetch:  # concurrent GETs on an async filesystem
            store.retry(fs.get, fetch, [local[p] for p in fetch])
        self.copied = len(local)
        return {t: [local[p] for p in files] for t, files in tables.items()}

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Any DuckDB SQL over the views, as a lazy relation (``df`` runs it and survives a compaction)."""
        return self.con.sql(query)

    def df(self, query: str, params: list[Any] | None = None) -> pd.DataFrame:
        """A query's result as pandas (``params``: the values of its ``?`` placeholders); lists the tables
        again if a compaction removed a file meanwhile."""
        if params:
            return self._retry(lambda: self.con.execute(query, params).df())
        return self._retry(lambda: self.con.sql(query).df())

    @property
    def cells(self) -> duckdb.DuckDBPyRelation:
        return self.con.table("cells")

    @property
    def fields(self) -> duckdb.DuckDBPyRelation:
        return self.con.table("fields")

    @property
    def failures(self) -> duckdb.DuckDBPyRelation:
        return self.con.table("failures")

    def wells(self, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS, by_timepoint: bool = True,
              where: str | None = None, with_map: bool = True, well: str | None = None,
              last: bool = False) -> pd.DataFrame:
        """Per well and timepoint aggregates as pandas (the ``wells`` view's rows), with the plate map's columns if
        there is one. ``last``: each well's last timepoint only; ``by_timepoint=False``: every timepoint pooled
        (``fields`` then still counts fields, ``images`` their images). ``well``: that well's only (a query
        parameter, never pasted into the SQL)."""
        cond, params = _filter(where, well)
        df = self.df(wells_sql(metrics, by_timepoint, cond), params)
        if last and by_timepoint:
            df = last_timepoint(df).sort_values(["plate", "well"]).reset_index(drop=True)
        return self.with_platemap(df) if with_map else df

    def rows(self, table: str, where: str | None = None, well: str | None = None) -> pd.DataFrame:
        """The fields or cells table's rows (path last), in plate, well, timepoint order, filtered by ``where``
        (SQL) and ``well`` (a query parameter)."""
        cond, params = _filter(where, well)
        sql = f"SELECT * EXCLUDE (path), path FROM {table}" + (f" WHERE {cond}" if cond else "")
        return self.df(sql + f" ORDER BY plate, well, {TIME}" + (", label" if table == "cells" else ""), params)


def last_timepoint(per_time: pd.DataFrame) -> pd.DataFrame:
    """Each well's row at its last timepoint, from per well and timepoint rows."""
    return per_time.sort_values(TIME).groupby(["plate", "well"], as_index=False).tail(1).reset_index(drop=True)


def _filter(where: str | None, well: str | None) -> tuple[str | None, list[Any] | None]:
    """A WHERE condition of a SQL filter and one well, that well a parameter of the query, never pasted in."""
    conds = [c for c in (where and f"({where})", "well = ?" if well else None) if c]
    return " AND ".join(conds) or None, [well] if well else None


_EMPTY = {
    "cells": "SELECT ''::VARCHAR AS plate, ''::VARCHAR AS well, ''::VARCHAR AS field_id, 0::UINTEGER AS label, "
             "0::BIGINT AS area_px, 0.0::DOUBLE AS eccentricity, 0.0::DOUBLE AS solidity, "
             "0.0::DOUBLE AS mean_intensity, 0.0::DOUBLE AS area_um2, ''::VARCHAR AS field, 0::INTEGER AS crop, "
             "''::VARCHAR AS cell_type, 0.0::DOUBLE AS timepoint, 0.0::DOUBLE AS timepoint_h",
    "fields": "SELECT ''::VARCHAR AS plate, ''::VARCHAR AS well, ''::VARCHAR AS field_id, 0::BIGINT AS n_cells, "
              "0.0::DOUBLE AS confluence, ''::VARCHAR AS field, 0::INTEGER AS crop, 0.0::DOUBLE AS timepoint, "
              "0.0::DOUBLE AS timepoint_h, NULL::TIMESTAMP AS acquired, ''::VARCHAR AS cell_type, "
              "''::VARCHAR AS cell_type_predicted, 0.0::DOUBLE AS cell_type_probability, "
              "''::VARCHAR AS well_cell_type, 0.0::DOUBLE AS well_cell_type_p, ''::VARCHAR AS routed_to, "
              "''::VARCHAR AS route_reason, ''::VARCHAR AS path, ''::VARCHAR AS status",
    "failures": "SELECT ''::VARCHAR AS key, ''::VARCHAR AS path, ''::VARCHAR AS field_id, ''::VARCHAR AS plate, "
                "''::VARCHAR AS well, ''::VARCHAR AS stage, ''::VARCHAR AS error, ''::VARCHAR AS time, "
                "0.0::DOUBLE AS timepoint_h",
}


#: Each table's documented columns and their types (from _EMPTY), added as NULL where a file lacks them.
_EMPTY_COLUMNS = {t: [(c, ty) for ty, c in re.findall(r"::(\w+) AS (\w+)", sql)] for t, sql in _EMPTY.items()}


def wells_sql(metrics: tuple[str, ...] | list[str], by_timepoint: bool = False, where: str | None = None) -> str:
    """SQL for per-well aggregates; unknown metric names raise ValueError listing the known ones.

    Field metrics (counts, confluence) aggregate fields; cell metrics aggregate the cells of those
    fields, so neither is weighted by the other. ``where`` filters fields (e.g. "cell_type = 'A172'").
    """
    metrics = [ALIASES.get(m, m) for m in metrics]
    unknown = [m for m in metrics if m not in WELL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(WELL_METRICS)}")
    keys = ["plate", "well"] + ([TIME] if by_timepoint else [])
    k = ", ".join(keys)
    fsel = ", ".join(f"{FIELD_METRICS[m]} AS {m}" for m in metrics if m in FIELD_METRICS) or "count(*) AS _n"
    csel = ", ".join(f"{CELL_METRICS[m]} AS {m}" for m in metrics if m in CELL_METRICS) or "count(*) AS _m"
    w = f"WHERE {where}" if where else ""
    return (f"WITH f AS (SELECT * FROM fields {w}), "
            f"c AS (SELECT * FROM cells WHERE field_id IN (SELECT field_id FROM f)), "
            f"fa AS (SELECT {k}, {fsel} FROM f GROUP BY {k}), "
            f"ca AS (SELECT {k}, {csel} FROM c GROUP BY {k}), "
            f"x AS (SELECT {k}, count(*) AS failed FROM failures GROUP BY {k}) "
            f"SELECT {', '.join('fa.' + key for key in keys)}, "
            f"{', '.join(_metric_col(m) for m in metrics)} "
            f"FROM fa LEFT JOIN ca USING ({k}) LEFT JOIN x ON {' AND '.join(f'x.{c} = fa.{c}' for c in keys)} "
            f"ORDER BY {', '.join('fa.' + key for key in keys)}")


def _metric_col(m: str) -> str:
    if m == "failed":
        return "coalesce(x.failed, 0) AS failed"
    return f"{'fa' if m in FIELD_METRICS else 'ca'}.{m}"


def open_results(out: str, storage_options: dict[str, Any] | None = None, copy_limit_mb: float = 1024,
                 platemap: str | None = None, save_platemap: bool = False) -> Results:
    """Open a run's OUT for querying: ``open_results('out').wells()``; ``platemap`` (CSV or Parquet) is
    validated and kept beside the results where none is, else used for this query only unless
    ``save_platemap`` (which replaces the saved one)."""
    return Results(out, storage_options, copy_limit_mb, platemap, save_platemap)
