"""A block of measured fields written and committed in one call.

Masks and cells files first, then each field's ``fields/`` commit marker. On an object store every
request costs tens of ms, so a block's array documents are read as one concurrent batch, its chunks
and cells files written as one, then its markers as one: about 3 round trips a block instead of 3 a
field. When a batch fails after its retries, the fields are written one by one, so that only a field
whose own writes fail is left uncommitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from livecell_ray.store._chunks import mask_documents, mask_files
from livecell_ray.store._files import Outputs, parquet_bytes, read_documents, table_from_columns, unwritable


@dataclass
class FieldResult:
    """One measured field-timepoint: where its arrays go, its planes, and its two tables' columns."""

    field_id: str
    path: str  # its input, named in errors
    plate: str
    well: str
    row: str
    column: int
    site: str
    t_index: int
    n_timepoints: int
    image: np.ndarray  # the instrument's values
    labels: np.ndarray
    cells: dict[str, Any]  # columns of its cells/ file
    field: dict[str, Any]  # columns of its fields/ row (the commit marker)
    failed_before: bool = False  # an earlier run left a failures/ row for it
    normalised: np.ndarray | None = None  # the model's uint8 plane, stored only in arrays of output format 0.2


def write_block(outputs: Outputs, fields: list[FieldResult], metadata: dict[str, str]) -> dict[str, str]:
    """Write and commit a block of fields; returns {field_id: reason} for those that could not be written."""
    docs = [mask_documents(outputs, f.plate, f.row, f.column, f.site) for f in fields]
    try:
        read = read_documents(outputs, [d for pair in docs for d in pair]) if fields else []
    except Exception:  # the store keeps failing: each field reads its own below, and fails alone if it must
        read = []
    errors: dict[str, str] = {}
    pending: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = {}
    for k, f in enumerate(fields):
        try:
            pending[f.field_id] = _files(outputs, f, read[2 * k: 2 * k + 2] or None, metadata)
        except Exception as exc:
            errors[f.field_id] = _reason(f, exc)
    try:
        outputs.write_many({p: b for files, _ in pending.values() for p, b in files.items()})
        outputs.write_many({p: b for _, marker in pending.values() for p, b in marker.items()})
    except Exception:  # some field's writes keep failing: find which, field by field
        for f in fields:
            if f.field_id not in pending:
                continue
            files, marker = pending[f.field_id]
            try:
                outputs.write_many(files)
                outputs.write_many(marker)
            except Exception as exc:
                if unwritable(exc):  # OUT's, not this field's: every field after it would fail the same way
                    raise
                del pending[f.field_id]
                errors[f.field_id] = _reason(f, exc)
    try:  # committed fields' failures/ rows from an earlier run go, in one request on an object store
        outputs.remove_many([outputs.table_path("failures", None, None, f.field_id)
                             for f in fields if f.failed_before and f.field_id in pending])
    except Exception:
        pass  # the fields are committed; the next run removes rows of done fields
    return errors


def _reason(f: FieldResult, exc: Exception) -> str:
    return f"{f.path}: cannot write outputs ({type(exc).__name__}: {exc})"


def _files(outputs: Outputs, f: FieldResult, documents: list[bytes | None] | None, metadata: dict[str, str]
           ) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A field's files: (masks and cells, its fields/ commit marker)."""
    _, files = mask_files(outputs, f.plate, f.row, f.column, f.site, f.t_index, f.n_timepoints, f.image, f.labels,
                          documents, f.normalised)
    cells, marker = _table_files(outputs, f.plate, f.well, f.field_id, f.cells, f.field, metadata)
    return {**files, **cells}, marker


def _table_files(outputs: Outputs, plate: str, well: str, field_id: str, cells: dict[str, Any],
                 field: dict[str, Any], metadata: dict[str, str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A field's two Parquet files: (its cells file, its fields/ commit marker)."""
    return ({outputs.table_path("cells", plate, well, field_id): parquet_bytes(table_from_columns(cells), metadata)},
            {outputs.table_path("fields", plate, well, field_id): parquet_bytes(table_from_columns(field), metadata)})


def commit_tables(outputs: Outputs, plate: str, well: str, field_id: str, cells: dict[str, Any],
                  field: dict[str, Any], metadata: dict[str, str], failed_before: bool = False) -> None:
    """Commit a field whose masks are written already (one streamed a band at a time): its cells file, then
    its fields/ marker, as :func:`write_block` does for a block of whole fields."""
    cells_file, marker = _table_files(outputs, plate, well, field_id, cells, field, metadata)
    outputs.write_many(cells_file)
    outputs.write_many(marker)
    if failed_before:
        try:
            outputs.remove_many([outputs.table_path("failures", None, None, field_id)])
        except Exception:
            pass  # committed; the next run removes rows of done fields
