"""Outputs that check themselves: every committed table file and Zarr chunk of an OUT read back, and what is
damaged named (``livecell-ray verify OUT``); ``repair`` un-commits the damaged fields so a rerun redoes them.

A field is committed by its fields/ row (:mod:`livecell_ray.store._commit`); its cells/ rows and its two Zarr
chunks (the image and the labels of its timepoint) were written before it. Damage is any of them unreadable
or absent, or labels that disagree with the table (a chunk that reads back as zeros while the table counts
134 cells). Un-committing removes the field's fields/ and cells/ files, or the compacted part that holds it
(its well's other fields are then redone too), never anything else.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import zarr

from livecell_ray.retry import one_line
from livecell_ray.store._commit import Committed, file_key, is_part
from livecell_ray.store._files import Outputs, is_local, join


@dataclass
class Damage:
    """One damaged file and why; ``source``: the fields/ file (a field's own, or a part) that commits it."""

    path: str
    reason: str
    source: str


@dataclass
class Report:
    fields: int = 0  # committed field-timepoints checked
    files: int = 0  # table files and chunks read
    damage: list[Damage] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # what --repair took out

    @property
    def ok(self) -> bool:
        return not self.damage


def _read(outputs: Outputs, path: str) -> Any:
    with outputs.fs.open(path, "rb") as f:
        return pq.read_table(io.BytesIO(f.read()))


def _store(outputs: Outputs) -> Any:
    if "://" not in outputs.url or outputs.url.startswith("file://"):
        return zarr.storage.LocalStore(outputs.url.removeprefix("file://"))
    return zarr.storage.FsspecStore.from_url(outputs.url, storage_options=outputs.storage_options)


def verify(out: str, storage_options: dict[str, Any] | None = None, repair: bool = False) -> Report:
    """Read back every committed Parquet file and each committed field's chunks; ``repair``: un-commit the
    fields they belong to (a rerun of the same command then redoes them)."""
    outputs = Outputs(out, storage_options)
    outputs.fs.invalidate_cache()
    c = outputs.committed()
    rep = Report(damage=[Damage(p, why, p) for p, why in c.damaged.items()])
    sources: dict[str, str] = {}  # fields/ file of each committed field_id
    rows = []
    for path in c.fields:
        rep.files += 1
        try:
            t = _read(outputs, path)
            cols = [k for k in ("field_id", "zarr_path", "t_index", "n_cells") if k in t.column_names]
            df = t.select(cols).to_pandas()
        except Exception as exc:  # noqa: BLE001 - named below, with the reason
            rep.damage.append(Damage(path, f"unreadable Parquet ({one_line(exc)})", path))
            continue
        for fid in df["field_id"]:
            sources[str(fid)] = path
        rows.append(df)
    committing = {file_key(p): p for p in c.fields}  # a cells/ file's key is its fields/ file's
    for path in c.cells:
        rep.files += 1
        source = committing.get(file_key(path), path)
        try:
            _read(outputs, path)
        except Exception as exc:  # noqa: BLE001
            rep.damage.append(Damage(path, f"unreadable Parquet ({one_line(exc)})", source))
    store = _store(outputs) if rows else None
    for df in rows:
        for r in df.itertuples(index=False):
            rep.fields += 1
            _check_field(outputs, store, r, sources[str(r.field_id)], rep)
    if repair and rep.damage:
        rep.removed = uncommit(outputs, sorted({d.source for d in rep.damage}))
    return rep


def _check_field(outputs: Outputs, store: Any, r: Any, source: str, rep: Report) -> None:
    """One field-timepoint's two chunks: present, decodable, and labels 1..n_cells as its row says."""
    t = int(r.t_index)
    for array in ("0", "labels/cells/0"):
        chunks = join(outputs.root, r.zarr_path, array, "c", str(t))
        rep.files += 1
        if not outputs.fs.exists(chunks) or not outputs.fs.find(chunks):
            rep.damage.append(Damage(chunks, f"chunk missing (reads back as zeros; the table says {int(r.n_cells)} "
                                             f"cells)", source))
            return
        try:
            arr = zarr.open_array(store, path=f"{r.zarr_path}/{array}", mode="r", zarr_format=3)
            plane = np.asarray(arr[t])
        except Exception as exc:  # noqa: BLE001
            rep.damage.append(Damage(chunks, f"chunk unreadable ({one_line(exc)})", source))
            return
        if array != "0" and int(plane.max(initial=0)) != int(r.n_cells):
            rep.damage.append(Damage(chunks, f"labels hold {int(plane.max(initial=0))} cells, the table says "
                                             f"{int(r.n_cells)}", source))


def unreadable_sources(outputs: Outputs, c: Committed) -> dict[str, str]:
    """The fields/ files whose committed per-field Parquet files (cells/ or fields/) are not whole: {source:
    reason}. What a rerun checks before it skips a field: both ends of each file (Parquet's magic bytes, the
    footer's length), two small reads a file, not the read of every byte that ``verify`` does. Local OUTs
    only: an object store's PUT is whole or absent, and a request a file each rerun would cost more than it
    could find."""
    if not is_local(outputs.url):
        return {}
    committing = {file_key(p): p for p in c.fields}
    bad: dict[str, str] = {}
    for path in c.fields + c.cells:
        # Compacted parts are left to ``verify``: the commit reader read each fields part whole already (a
        # damaged one is in c.damaged), a cells part is not checked here.
        if is_part(path):
            continue
        why = _not_whole(path)
        if why:
            bad.setdefault(committing.get(file_key(path), path), f"{path}: {why}")
    return bad


def _not_whole(path: str) -> str:
    """'' for a file that starts and ends as Parquet does and is as long as its footer says; else why not."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 8))
            tail = f.read(8)
    except OSError as exc:
        return one_line(exc)
    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1":
        return f"not a whole Parquet file ({size} bytes, no magic bytes at its ends)"
    if int.from_bytes(tail[:4], "little") > size - 12:
        return f"truncated Parquet file ({size} bytes, shorter than its footer says)"
    return ""


def uncommit(outputs: Outputs, sources: list[str]) -> list[str]:
    """Remove the fields/ files (a field's own, or a part) and their cells/ twins: those fields are no longer
    done, so the next run redoes them. Returns what was removed."""
    gone = []
    for src in sources:
        head, sep, tail = src.rpartition("/fields/")
        if not sep:  # a cells file with no committing fields/ file: itself
            head, sep, tail = src.rpartition("/cells/")
        pair = [f"{head}/fields/{tail}", f"{head}/cells/{tail}"]
        for p in pair:
            if outputs.fs.exists(p):
                gone.append(p)
        outputs.remove_many(pair)
    if not is_local(outputs.url):
        outputs.fs.invalidate_cache()
    return gone
