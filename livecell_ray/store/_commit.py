"""The commit protocol: which table files count, so that every field is there exactly once.

A field is done exactly when its ``fields/`` row exists, written after its masks and cells; a
compacted part is committed by its ``fields/`` file, which names the older parts it replaces.
"""

from __future__ import annotations

import dataclasses
import io
import json

import pyarrow.parquet as pq

from livecell_ray.retry import one_line

#: Compacted files of a well start with this; per-field files are named by their 16-hex field_id.
PART_PREFIX = "part-"
#: Schema metadata key of a compacted fields/ part: the ids of the older parts it replaces (JSON list).
SUPERSEDES_KEY = "livecell_ray.supersedes"


def is_part(path: str) -> bool:
    """A compacted part (many fields of one well) rather than one field's file."""
    return path.rsplit("/", 1)[-1].startswith(PART_PREFIX)


def file_key(path: str) -> str:
    """A table file's key: the field_id of a per-field file, the part id of a part."""
    name = path.rsplit("/", 1)[-1]
    return name[: -len(".parquet")]


@dataclasses.dataclass
class Committed:
    """What counts in cells/ and fields/, per the compaction protocol (:mod:`livecell_ray.store.compact`).

    A field is committed by its per-field fields/ file, or by a row in a compacted fields/ part. A
    part is committed once its fields/ file exists (its cells/ file is written first); a committed part
    lists in its metadata the older parts it replaces. So a reader takes: the parts not replaced (nor
    holding only fields that a larger live part holds), and the per-field files of committed fields
    those parts do not hold. Whatever else is there (replaced parts, per-field files already in a
    part, a cells part whose compaction never committed, the cells of a field never committed) is
    ignored, and the next compaction removes what is stale.
    """

    cells: list[str]
    fields: list[str]
    done: set[str]
    parts: dict[str, set[str]]  # live part id -> the field_ids it holds
    stale: list[str]  # files a finished compaction leaves to remove
    # cells parts that no fields part committed: a compaction cut off mid-way, or one still running
    orphans: list[str]
    # fields/ files (parts or per-field) whose cells file, written before them, is not in the listing:
    # a compaction changed the folder between the listings of cells/ and fields/ (or a file was deleted)
    lacking_cells: list[str] = dataclasses.field(default_factory=list)
    part_docs: dict[str, bytes] = dataclasses.field(default_factory=dict)  # the live fields parts' bytes, as read
    # fields parts that cannot be read (truncated, corrupted): their fields count as not done, so a rerun
    # redoes them; ``livecell-ray verify`` names them and ``--repair`` removes them
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.lacking_cells

    @classmethod
    def resolve(cls, cells: list[str], fields: list[str], part_docs: dict[str, bytes | None]) -> Committed:
        replaced: set[str] = set()
        held: dict[str, set[str]] = {}
        damaged: dict[str, str] = {}
        for path, doc in part_docs.items():
            if doc is None:  # removed since the listing: a compaction replaced it
                continue
            try:
                t = pq.read_table(io.BytesIO(doc), columns=["field_id"])
            except Exception as exc:  # noqa: BLE001 - a damaged part: named, and its fields redone
                damaged[path] = f"unreadable Parquet ({one_line(exc)})"
                continue
            meta = t.schema.metadata or {}
            replaced.update(json.loads(meta.get(SUPERSEDES_KEY.encode(), b"[]")))
            held[file_key(path)] = set(t.column("field_id").to_pylist())
        live = {k: v for k, v in held.items() if k not in replaced}
        # Two compactions of a well that ran at once both commit, each replacing what it saw. The one
        # that listed later saw every field the other did (fields only leave the view once a committed
        # part holds them), so a part whose fields another live part also holds adds nothing: the
        # larger one counts (the greater id when equal), and the smaller is as good as replaced.
        kept: dict[str, set[str]] = {}
        for k in sorted(live, key=lambda k: (len(live[k]), k), reverse=True):
            if not any(live[k] <= v for v in kept.values()):
                kept[k] = live[k]
        gone = held.keys() - kept.keys()
        in_parts = set().union(*kept.values()) if kept else set()
        markers = {file_key(p) for p in fields if not is_part(p)}
        own = markers - in_parts  # committed by their own file, not yet in a part
        keep_fields = [p for p in fields if file_key(p) in kept or file_key(p) in own]
        keep_cells = [p for p in cells if file_key(p) in kept or file_key(p) in own]
        stale = [p for p in cells + fields if (is_part(p) and file_key(p) in gone)
                 or (not is_part(p) and file_key(p) in in_parts)]
        orphans = [p for p in cells if is_part(p) and file_key(p) not in held]
        # Every committed source of field rows has its cells file (written before it) in the listing.
        has_cells = {file_key(p) for p in keep_cells}
        lacking = [p for p in keep_fields if file_key(p) not in has_cells and p not in damaged]
        docs = {p: d for p, d in part_docs.items() if d is not None and file_key(p) in kept}
        return cls(keep_cells, keep_fields, in_parts | own, kept, stale, orphans, lacking, docs, damaged)


