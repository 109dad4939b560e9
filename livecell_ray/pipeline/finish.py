"""A segmented field's end in its shard task: measured, written and committed through the store, or its row in
failures/; and the plates' NGFF metadata, written before any field."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from livecell_ray import store
from livecell_ray.measure import measure_cells, measure_field
from livecell_ray.retry import one_line

if TYPE_CHECKING:  # the driver's: the shard workers never import pandas or the manifest (0.25 s of CPU each)
    import pandas as pd


log = logging.getLogger(__name__)


def field_summary(row: dict[str, Any], node: str) -> dict[str, Any]:
    """A field's summary for the driver, as it stands before it is measured and written (``node``: this one)."""
    return {"field_id": str(row["field_id"]), "path": str(row["path"]), "status": str(row["status"]), "n_cells": 0,
            "stage": str(row["stage"]), "error": str(row["error"]), "model_node": str(row.get("model_node", "")),
            "model_pid": int(row.get("model_pid", 0)), "measure_node": node, "measure_pid": os.getpid(),
            "read_s": float(row.get("read_s", 0.0)), "model_s": float(row.get("model_s", 0.0)),
            "pixel_size": float(row.get("pixel_size", np.nan))}


def write_plates(out: str, storage_options: dict[str, Any], fields: pd.DataFrame, pixel_size: float | None,
                 prov: dict[str, Any], layouts: dict[str, dict[str, Any]]) -> None:
    """The plates' NGFF metadata and layout (:func:`livecell_ray.store.init_plates`), retried on transient
    errors; before any field of them is written."""
    outputs = store.Outputs(out, storage_options)
    store.retry(store.init_plates, outputs, fields, pixel_size, prov, layouts)


def finish_field(row: dict[str, Any], out: str, storage_options: dict[str, Any], pixel_size: float | None,
                 provenance_meta: dict[str, str]) -> dict[str, Any]:
    """Measure and write one field (see :func:`finish_fields`); returns its summary."""
    return finish_fields([row], out, storage_options, pixel_size, provenance_meta)[0]


def finish_fields(rows: list[dict[str, Any]], out: str, storage_options: dict[str, Any], pixel_size: float | None,
                  provenance_meta: dict[str, str]) -> list[dict[str, Any]]:
    """Measure a block of fields, then hand them to the store, which writes and commits them in one call
    (:func:`livecell_ray.store.write_block`). A field that cannot be measured ends in failures/ with stage
    measure, one whose own writes keep failing with stage write.
    """
    t0 = time.perf_counter()
    outputs = store.Outputs(out, storage_options)
    import ray

    node = ray.get_runtime_context().get_node_id()
    summaries = [field_summary(r, node) for r in rows]
    block: list[tuple[int, store.FieldResult]] = []
    for i, (row, summary) in enumerate(zip(rows, summaries)):
        if summary["status"] != "ok":
            continue
        try:
            labels = np.asarray(row["labels"])
            raw = np.asarray(row["raw"])
            cls = np.frombuffer(row["class_ids"], np.int16)
            conf = np.frombuffer(row["confidences"], np.float32)
            px = float(row.get("pixel_size", np.nan))
            cells = measure_cells(labels, raw, cls, conf, px if px > 0 else pixel_size)
            fstats = measure_field(labels, raw)
        except Exception as exc:
            summary.update(status="failed", stage="measure", error=f"{row['path']}: {one_line(exc)}")
            continue
        block.append((i, _field_result(row, labels, cells, fstats)))
    errors = store.write_block(outputs, [f for _, f in block], provenance_meta)
    for i, f in block:
        if f.field_id in errors:
            summaries[i].update(status="failed", stage="write", error=errors[f.field_id])
        else:
            summaries[i]["n_cells"] = len(f.cells["label"])
            summaries[i]["shape"] = list(f.labels.shape)
            conf = np.frombuffer(rows[i]["confidences"], np.float32)
            summaries[i]["mean_confidence"] = float(conf.mean()) if len(conf) else float("nan")
            summaries[i]["coverage"] = float((f.labels > 0).mean()) if f.labels.size else 0.0
    for row, s in zip(rows, summaries):
        if s["status"] != "ok":
            write_failure(outputs, s["field_id"], s["path"], s["field_id"], str(row["plate"]), str(row["well"]),
                          s["stage"], s["error"], row.get("timepoint_h"))
    each = (time.perf_counter() - t0) / max(1, len(rows))
    for s in summaries:
        s["finish_s"] = each
    return summaries


def _field_result(row: dict[str, Any], labels: np.ndarray, cells: dict[str, np.ndarray],
                  fstats: dict[str, Any]) -> store.FieldResult:
    """A measured field as the store writes it: its planes, its cells/ columns and its fields/ row."""
    cells_cols, field_cols = field_tables(row, cells, fstats)
    return store.FieldResult(str(row["field_id"]), str(row["path"]), str(row["plate"]), str(row["well"]),
                             str(row["row"]), int(row["column"]), str(row["site"]), int(row["t_index"]),
                             int(row["n_timepoints"]), np.asarray(row["raw"]), labels, cells_cols, field_cols,
                             bool(row.get("failed_before")), np.asarray(row["image"]))


def field_tables(row: dict[str, Any], cells: dict[str, np.ndarray], fstats: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A measured field's cells/ columns and fields/ row."""
    fid, plate = str(row["field_id"]), str(row["plate"])
    meta = {k: str(row[k]) for k in ("field", "site", "cell_type", "path")}
    n = len(cells["label"])
    cells_cols = {"field_id": [fid] * n, **cells,
                  "field": [meta["field"]] * n, "crop": np.full(n, int(row["crop"]), np.int32),
                  "site": [meta["site"]] * n, "timepoint": np.full(n, float(row["timepoint"])),
                  "timepoint_h": np.full(n, float(row["timepoint_h"])),
                  "cell_type": [meta["cell_type"]] * n, "path": [meta["path"]] * n}
    field_cols = {
        "field_id": [fid], "path": [meta["path"]], "field": [meta["field"]],
        "crop": [int(row["crop"])], "site": [meta["site"]], "timepoint": [float(row["timepoint"])],
        "timepoint_h": [float(row["timepoint_h"])], "acquired": [_acquired(str(row.get("acquired") or ""))],
        "t_index": [int(row["t_index"])], "cell_type": [meta["cell_type"]],
        "cell_type_predicted": [str(row.get("cell_type_predicted", ""))],
        "cell_type_probability": [float(row.get("cell_type_probability", np.nan))],
        "well_cell_type": [str(row.get("well_cell_type", ""))],
        "well_cell_type_p": [float(row.get("well_cell_type_p", np.nan))],
        "routed_to": [str(row.get("routed_to", ""))],
        "route_reason": [str(row.get("route_reason") or ("file name" if meta["cell_type"] else "general model"))],
        "zarr_path": [store.field_zarr_path(plate, str(row["row"]), int(row["column"]), str(row["site"]))],
        **{k: [v] for k, v in fstats.items()}, "status": ["ok"],
    }
    return cells_cols, field_cols


def _acquired(iso: str) -> Any:
    """The acquisition time as a Parquet timestamp (no time zone: the instrument's clock); None when the
    names carry none."""
    return datetime.fromisoformat(iso) if iso else None


def write_failure(outputs: store.Outputs, key: str, path: str, field_id: str, plate: str, well: str,
                  stage: str, error: str, timepoint_h: float | None = None) -> dict[str, Any]:
    """One row in failures/, keyed so that a rerun overwrites rather than duplicates it (``timepoint_h``: the
    image's, where it is known, so that per-timepoint well rows count their own failures)."""
    rec = {"key": key, "path": path, "field_id": field_id, "plate": plate, "well": well, "stage": stage,
           "error": error, "time": datetime.now(timezone.utc).isoformat(),
           "timepoint_h": None if timepoint_h is None or timepoint_h != timepoint_h else float(timepoint_h)}
    import pyarrow as pa

    table = store.table_from_columns({k: [v] for k, v in rec.items() if k != "timepoint_h"})
    table = table.append_column("timepoint_h", pa.array([rec["timepoint_h"]], pa.float64()))
    outputs.write_table(outputs.table_path("failures", None, None, key), table)
    return rec


def refuse_mixed_shapes(outputs: store.Outputs, fields: pd.DataFrame, done: list[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    """Timepoints of one field (one site's series) that came out of this run at different sizes: each whose
    size is not its array's is un-committed (its fields/ and cells/ rows and its chunks removed) and recorded
    in failures/ naming both sizes; returns their summaries, now failed. Across runs the store refuses such a
    timepoint as it is written; within one run, the timepoints that create a site's arrays may race, so the
    driver checks once every shard is in. ``done``: this run's summaries of committed fields."""
    if not done:
        return []
    import json

    import pandas as pd

    site = ["plate", "row", "column", "site"]
    runs = pd.DataFrame(done).merge(fields[["field_id", "well", "t_index", "timepoint_h", *site]], on="field_id")
    runs["shape"] = runs["shape"].map(tuple)
    runs = runs[runs.groupby(site)["shape"].transform("nunique") > 1]  # nearly always none
    refused = []
    for (plate, row, column, site_name), g in runs.groupby(site):
        plate, row, column, site_name = str(plate), str(row), int(column), str(site_name)
        docs = store.read_documents(outputs, store.mask_documents(outputs, plate, row, column, site_name))
        labels_doc = docs[1] or docs[0]
        declared = tuple(json.loads(labels_doc)["shape"][1:]) if labels_doc else ()
        for s in g[[shape != declared for shape in g["shape"]]].to_dict("records"):
            well, t = str(s["well"]), int(s["t_index"])
            outputs.remove_many([outputs.table_path("fields", plate, well, s["field_id"]),
                                 outputs.table_path("cells", plate, well, s["field_id"]),
                                 *store.chunk_files(outputs, plate, row, column, site_name, t)])
            h, w = s["shape"]
            error = (f"{s['path']}: {w}x{h} px, but its field (plate {plate}, well {well}, site {site_name}) is "
                     f"{declared[1] if declared else '?'}x{declared[0] if declared else '?'} px at another "
                     f"timepoint: every timepoint of a field must have one size")
            write_failure(outputs, s["field_id"], s["path"], s["field_id"], plate, well, "write", error,
                          s["timepoint_h"])
            refused.append({**s, "status": "failed", "stage": "write", "error": error})
    return refused
