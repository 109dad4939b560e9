"""Compaction: a well's per-field Parquet files merged into one part per table, safely.

The pipeline writes one cells/ and one fields/ file per field-timepoint, because that makes each
field's commit atomic and a rerun exact. A plate of 96 wells x 9 fields x 48 timepoints is then
83,000 files a table; every query opens each of them (on an object store, a request each, one
after the other inside DuckDB). Compaction turns a well's files into one part a table.

The protocol, per well (runs may write meanwhile, and compactions may overlap):
1. list the well; take its live parts and the per-field files of committed fields not in a part;
2. write the new cells part, every row of those inputs;
3. write the new fields part: its existence commits the part, and its metadata names the parts it
   replaces (readers: :class:`livecell_ray.store.Committed`);
4. remove what is now stale: replaced parts, per-field files now in the part, and cells parts whose
   compaction was cut off before step 3 (once an hour old: a younger one may be another's, at work).
A crash anywhere leaves each row readable exactly once; the next compaction finishes the clean-up.
Two compactions of a well at once both commit; readers take the larger part (it holds every field of
the smaller one) and the next compaction removes the other.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from livecell_ray import store


@dataclass
class CompactSummary:
    """What one compaction did, over all the wells it looked at."""

    wells: int = 0
    wells_compacted: int = 0
    fields: int = 0  # field rows in the wells' new parts
    files_before: int = 0  # cells/ and fields/ files in those wells before
    files_after: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)


def _crash_point(name: str) -> None:
    """Test hook: LIVECELL_RAY_CRASH_IN_COMPACT=<name> kills the process at that step."""
    if os.environ.get("LIVECELL_RAY_CRASH_IN_COMPACT") == name:
        os.kill(os.getpid(), 9)


#: A cells part no fields part committed is removed once this old: younger, its compaction may still run.
ORPHAN_AGE_S = 3600.0


def _tables(docs: list[bytes | None], paths: list[str]) -> list[pa.Table]:
    out = []
    for path, doc in zip(paths, docs):
        if doc is None:
            raise FileNotFoundError(f"{path}: removed while being compacted (by another compaction?); "
                                    "the well is left as it was")
        try:
            out.append(pq.read_table(io.BytesIO(doc)))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc}); the well is left as it was") from exc
    return out


def _merge(cells: list[pa.Table], cell_paths: list[str], fields: list[pa.Table], field_paths: list[str],
           replaced: list[str]) -> tuple[pa.Table, pa.Table]:
    """The new part's two tables. Each field's rows come from one source: the first (by key) of the
    fields sources that holds it, so parts that overlap (see :class:`store.Committed`) merge into one
    copy."""
    owner: dict[str, str] = {}
    total = 0
    for path, t in zip(field_paths, fields):
        ids = t.column("field_id").to_pylist()
        total += len(ids)
        for f in ids:
            owner.setdefault(f, store.file_key(path))
    if total != len(owner):
        def only_own(path: str, t: pa.Table) -> pa.Table:
            key = store.file_key(path)
            return t.filter(pa.array([owner.get(f) == key for f in t.column("field_id").to_pylist()]))

        cells = [only_own(p, t) for p, t in zip(cell_paths, cells)]
        fields = [only_own(p, t) for p, t in zip(field_paths, fields)]
    meta = {store.SUPERSEDES_KEY.encode(): json.dumps(sorted(replaced)).encode()}
    out = []
    for tables, extra in ((cells, {}), (fields, meta)):
        t = pa.concat_tables(tables, promote_options="permissive")
        out.append(t.replace_schema_metadata({**(tables[0].schema.metadata or {}), **extra}))
    return out[0], out[1]


def _age_s(outputs: store.Outputs, path: str) -> float:
    """Seconds since the file was last written (0 when that cannot be told: it is then kept)."""
    from datetime import datetime, timezone

    try:
        modified = outputs.fs.modified(path)
    except (OSError, NotImplementedError):
        return 0.0
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - modified).total_seconds()


def compact_well(outputs: store.Outputs, plate: str, well: str,
                 orphan_age_s: float = ORPHAN_AGE_S) -> tuple[int, int, int, int]:
    """Compact one well (see the module's protocol); returns (fields in the new part or 0 when nothing
    needed merging, files before, files after, files removed)."""
    c = outputs.committed(plate, well)
    if not c.complete:
        raise FileNotFoundError(f"{c.lacking_cells[0]}: its cells file is missing (the well kept changing while "
                                "listed, or a file was removed by hand); the well is left as it was")
    before = len(c.cells) + len(c.fields) + len(c.stale) + len(c.orphans)
    well_dir = (f"plate={store.safe(plate)}", f"well={store.safe(well)}")
    n = 0
    # Orphaned cells parts go first, while no part of this compaction exists to be mistaken for one;
    # only old ones: a young one may be another compaction's, between its two writes.
    remove = [p for p in c.orphans if _age_s(outputs, p) >= orphan_age_s]
    if len(c.fields) > 1:  # one live part alone, or one field alone: nothing to merge
        part = f"{store.PART_PREFIX}{uuid.uuid4().hex[:12]}.parquet"
        docs = store.read_documents(outputs, c.cells + c.fields)
        cells, fields = _merge(_tables(docs[: len(c.cells)], c.cells), c.cells,
                               _tables(docs[len(c.cells):], c.fields), c.fields, list(c.parts))
        n = fields.num_rows
        outputs.write_bytes(store.join(outputs.root, "cells", *well_dir, part), store.parquet_bytes(cells))
        _crash_point("cells_part")
        outputs.write_bytes(store.join(outputs.root, "fields", *well_dir, part), store.parquet_bytes(fields))
        _crash_point("fields_part")  # committed: everything it read is now stale
        remove += c.cells + c.fields
    # Cells before fields: a replaced part's fields/ file going first would leave its cells part looking
    # like an orphan if this stopped in between (harmless, but one more file for the next clean-up).
    remove += c.stale
    remove.sort(key=lambda p: "/fields/" in p)
    outputs.remove_many(remove)
    return n, before, before + (2 if n else 0) - len(remove), len(remove)


def wells(outputs: store.Outputs) -> list[tuple[str, str]]:
    """(plate, well) of every well with a fields/ folder, as the folder names spell them."""
    base = store.join(outputs.root, "fields")
    if not outputs.fs.exists(base):
        return []
    out = []
    for pdir in outputs.fs.ls(base, detail=False):
        pname = pdir.rstrip("/").rsplit("/", 1)[-1]
        if not pname.startswith("plate="):
            continue
        for wdir in outputs.fs.ls(pdir, detail=False):
            wname = wdir.rstrip("/").rsplit("/", 1)[-1]
            if wname.startswith("well="):
                out.append((pname[len("plate="):], wname[len("well="):]))
    return sorted(out)


def compact(out: str, storage_options: dict[str, Any] | None = None,
            only: list[tuple[str, str]] | None = None, threads: int = 8,
            progress: Callable[[int, int], None] | None = None, orphan_age_s: float = ORPHAN_AGE_S
            ) -> CompactSummary:
    """Compact every well of OUT (or only the given (plate, well) pairs), a few wells at a time.

    Wells are independent, and their work is mostly waiting on storage, so threads overlap them. A
    well that fails is reported and left as it was (still readable); the others go on.
    """
    outputs = store.Outputs(out, storage_options)
    todo = sorted(set(only)) if only is not None else wells(outputs)
    summary = CompactSummary(wells=len(todo))

    def one(pw: tuple[str, str]) -> tuple[tuple[str, str], Any]:
        try:
            return pw, compact_well(outputs, *pw, orphan_age_s=orphan_age_s)
        except Exception as exc:  # noqa: BLE001 - reported per well, the rest carry on
            return pw, exc

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for k, ((plate, well), res) in enumerate(pool.map(one, todo), start=1):
            if isinstance(res, Exception):
                summary.errors.append(f"plate {plate}, well {well}: {type(res).__name__}: {res}")
            else:
                n, before, after, removed = res
                summary.wells_compacted += bool(n)
                summary.fields += n
                summary.files_before += before
                summary.files_after += after
                summary.removed += removed
            if progress:
                progress(k, len(todo))
    return summary
