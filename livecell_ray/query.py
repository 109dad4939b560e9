"""Per-well answers from a run's Parquet tables, through DuckDB.

Views: ``cells`` (one row per cell), ``fields`` (one row per field-timepoint), ``failures`` and
``wells`` (per well and timepoint aggregates). Works on local paths and on object stores
(s3://, gs://...) through fsspec registered in DuckDB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import duckdb
import pandas as pd

from livecell_ray import store

#: per-well metrics over fields (one row per field-timepoint) ...
FIELD_METRICS: dict[str, str] = {
    "fields": "count(*)",
    "cells": "sum(n_cells)::BIGINT",
    "cells_per_field_mean": "avg(n_cells)",
    "cells_per_field_sd": "stddev_samp(n_cells)",
    "confluence": "avg(confluence)",
}
#: ... and over the cells of those fields.
CELL_METRICS: dict[str, str] = {
    "area_median": "median(area_px)",
    "area_mean": "avg(area_px)",
    "eccentricity_mean": "avg(eccentricity)",
    "solidity_mean": "avg(solidity)",
    "intensity_mean": "avg(mean_intensity)",
}
WELL_METRICS: dict[str, str] = {**FIELD_METRICS, **CELL_METRICS, "failed": "failures per well"}
ALIASES = {"count": "cells", "n_cells": "cells", "area": "area_median", "eccentricity": "eccentricity_mean",
           "solidity": "solidity_mean", "intensity": "intensity_mean"}
#: DuckDB's words for a file that was listed but is gone when read.
_VANISHED = ("No files found that match", "No such file")
_REOPEN_TRIES = 4
T = TypeVar("T")
DEFAULT_METRICS = ("fields", "cells", "cells_per_field_mean", "cells_per_field_sd", "confluence",
                   "area_median", "area_mean", "eccentricity_mean", "solidity_mean", "intensity_mean", "failed")


class Results:
    """A run's outputs as DuckDB relations (``cells``, ``fields``, ``failures``, ``wells``).

    On an object store the tables' files are first copied to a temporary folder, all at once, when
    together they are at most ``copy_limit_mb``: DuckDB reads fsspec files one request after another
    (three a file), so a plate's few hundred files would cost seconds of round trips on every query.
    Larger tables are read where they are. The copy goes when this object does.
    """

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None, copy_limit_mb: float = 1024):
        self.outputs = store.Outputs(out, storage_options)
        self.copy_limit_mb = copy_limit_mb
        # DuckDB draws a progress bar on stdout for queries over 2 s, which would end up inside the
        # CSV or JSON that `livecell-ray query` writes there.
        self.con = duckdb.connect()
        self.con.execute("SET enable_progress_bar = false")
        self.copied = 0  # files read from a local copy
        self._tmp: Any = None  # the finalizer of the current local copy
        self._retry(lambda: None, stale=True)

    def _open(self) -> None:
        """List the committed files and (re)make the views over them."""
        c = self.outputs.committed()
        tables = {"cells": c.cells, "fields": c.fields, "failures": self.outputs.table_files("failures")}
        if not store.is_local(self.outputs.url):
            tables = self._local_copies(tables, self.copy_limit_mb, c.part_docs)
        for table, files in tables.items():
            # Only committed rows, each once: per-field files and compacted parts (store.Committed).
            if files:
                rel = self.con.read_parquet(files, hive_partitioning=table != "failures", union_by_name=True)
                rel.create_view(table, replace=True)
            else:
                self.con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM ({_EMPTY[table]}) WHERE false")
        self.con.execute(f"CREATE OR REPLACE VIEW wells AS {wells_sql(DEFAULT_METRICS, by_timepoint=True)}")

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

    def df(self, query: str) -> pd.DataFrame:
        """A query's result as pandas; lists the tables again if a compaction removed a file meanwhile."""
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

    def wells(self, metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS, by_timepoint: bool = False,
              where: str | None = None) -> pd.DataFrame:
        """Per-well (or per well x timepoint) aggregates as pandas."""
        sql = wells_sql(metrics, by_timepoint, where)
        return self._retry(lambda: self.con.sql(sql).df())


_EMPTY = {
    "cells": "SELECT ''::VARCHAR AS plate, ''::VARCHAR AS well, ''::VARCHAR AS field_id, 0::UINTEGER AS label, "
             "0::BIGINT AS area_px, 0.0::DOUBLE AS eccentricity, 0.0::DOUBLE AS solidity, "
             "0.0::DOUBLE AS mean_intensity, ''::VARCHAR AS cell_type, 0.0::DOUBLE AS timepoint",
    "fields": "SELECT ''::VARCHAR AS plate, ''::VARCHAR AS well, ''::VARCHAR AS field_id, 0::BIGINT AS n_cells, "
              "0.0::DOUBLE AS confluence, 0.0::DOUBLE AS timepoint, ''::VARCHAR AS cell_type, "
              "''::VARCHAR AS path, ''::VARCHAR AS status",
    "failures": "SELECT ''::VARCHAR AS key, ''::VARCHAR AS path, ''::VARCHAR AS field_id, ''::VARCHAR AS plate, "
                "''::VARCHAR AS well, ''::VARCHAR AS stage, ''::VARCHAR AS error, ''::VARCHAR AS time",
}


def wells_sql(metrics: tuple[str, ...] | list[str], by_timepoint: bool = False, where: str | None = None) -> str:
    """SQL for per-well aggregates; unknown metric names raise ValueError listing the known ones.

    Field metrics (counts, confluence) aggregate fields; cell metrics aggregate the cells of those
    fields, so neither is weighted by the other. ``where`` filters fields (e.g. "cell_type = 'A172'").
    """
    metrics = [ALIASES.get(m, m) for m in metrics]
    unknown = [m for m in metrics if m not in WELL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(WELL_METRICS)}")
    keys = ["plate", "well"] + (["timepoint"] if by_timepoint else [])
    k = ", ".join(keys)
    fsel = ", ".join(f"{FIELD_METRICS[m]} AS {m}" for m in metrics if m in FIELD_METRICS) or "count(*) AS _n"
    csel = ", ".join(f"{CELL_METRICS[m]} AS {m}" for m in metrics if m in CELL_METRICS) or "count(*) AS _m"
    w = f"WHERE {where}" if where else ""
    return (f"WITH f AS (SELECT * FROM fields {w}), "
            f"c AS (SELECT * FROM cells WHERE field_id IN (SELECT field_id FROM f)), "
            f"fa AS (SELECT {k}, {fsel} FROM f GROUP BY {k}), "
            f"ca AS (SELECT {k}, {csel} FROM c GROUP BY {k}), "
            f"x AS (SELECT plate, well, count(*) AS failed FROM failures GROUP BY plate, well) "
            f"SELECT {', '.join('fa.' + key for key in keys)}, "
            f"{', '.join(_metric_col(m) for m in metrics)} "
            f"FROM fa LEFT JOIN ca USING ({k}) LEFT JOIN x ON x.plate = fa.plate AND x.well = fa.well "
            f"ORDER BY {', '.join('fa.' + key for key in keys)}")


def _metric_col(m: str) -> str:
    if m == "failed":
        return "coalesce(x.failed, 0) AS failed"
    return f"{'fa' if m in FIELD_METRICS else 'ca'}.{m}"


def open_results(out: str, storage_options: dict[str, Any] | None = None, copy_limit_mb: float = 1024) -> Results:
    """Open a run's OUT for querying: ``open_results('out').wells()``."""
    return Results(out, storage_options, copy_limit_mb)
