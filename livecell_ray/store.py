"""Where results live: OME-NGFF 0.5 HCS plates in Zarr v3, Parquet tables, run.json.

Layout under OUT (an fsspec URL)::

    masks/<plate>.zarr/<row>/<col>/<site>/0                 image the model saw, uint8 (t, y, x)
    masks/<plate>.zarr/<row>/<col>/<site>/labels/cells/0    instance labels, uint32 (t, y, x)
    cells/plate=<p>/well=<w>/<field_id>.parquet              one row per cell
    fields/plate=<p>/well=<w>/<field_id>.parquet             one row per field-timepoint (commit marker)
    failures/<key>.parquet                                   one row per input that failed
    run.json                                                 provenance and counts

Every table file is written under a temporary name and renamed, so a reader never sees half a
file. A field counts as done exactly when its ``fields/`` file exists: it is written last, after the
masks and the cells, which makes a rerun resume without duplicates.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from livecell_ray.manifest import apply_layout, parse_well

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe(name: str) -> str:
    """A path component that is the same on every filesystem and object store."""
    return _SAFE.sub("-", str(name)) or "_"


def join(base: str, *parts: str) -> str:
    """Join URL components with '/', whatever the filesystem."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(url: str) -> bool:
    """A plain path or file:// URL (renames are atomic); anything else is an object store."""
    return "://" not in url or url.startswith("file://")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for a URL (local directories are created on write)."""
    opts = dict(storage_options or {})
    if is_local(url):
        opts.setdefault("auto_mkdir", True)
    return fsspec.core.url_to_fs(url, **opts)


def retry(fn, *args, attempts: int = 5, base_delay: float = 0.2, **kwargs):
    """Call fn, retrying transient I/O errors (object-store 5xx, throttling, dropped connections) with
    exponential backoff; the last error propagates so the caller can record the field as failed."""
    import random
    import time

    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            raise  # not transient
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(base_delay * (2**i) * (0.5 + random.random()))


class Outputs:
    """Paths and atomic writers for one OUT location."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None):
        if "://" not in out:
            import os

            out = os.path.abspath(out)
        self.url = out.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.listed_sizes: dict[str, int | None] = {}  # object-store files' sizes, from the latest listings

    # ---------- paths ----------
    def plate_url(self, plate: str) -> str:
        return join(self.url, "masks", f"{safe(plate)}.zarr")

    def plate_path(self, plate: str) -> str:
        """The plate's Zarr root as a path on ``self.fs`` (for listings and direct writes)."""
        return join(self.root, "masks", f"{safe(plate)}.zarr")

    def table_path(self, table: str, plate: str | None, well: str | None, key: str) -> str:
        if plate is None:
            return join(self.root, table, f"{key}.parquet")
        return join(self.root, table, f"plate={safe(plate)}", f"well={safe(well or '')}", f"{key}.parquet")

    # ---------- tables ----------
    def write_table(self, path: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        """Write a Parquet file atomically (temporary name, then rename)."""
        self.write_bytes(path, parquet_bytes(table, metadata))

    def write_many(self, files: dict[str, bytes]) -> None:
        """Write several files, each whole or not at all; on an object store as one concurrent batch.

        A field's outputs are four or five small objects: one after the other, an object store's
        latency (tens of ms a request) rather than any CPU would bound how fast a task writes fields.
        """
        if not files:
            return
        if not is_local(self.url):
            retry(self.fs.pipe, files)  # async filesystems (s3fs, gcsfs, adlfs) send these concurrently
            return
        for path, data in files.items():
            self.write_bytes(path, data)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a file whole or not at all: a reader never sees half of it."""
        if not is_local(self.url):
            # Object stores publish a PUT whole or not at all: no temporary name needed.
            retry(self.fs.pipe_file, path, data)
            return
        _write_local(path, data)

    def clean_temporary(self) -> int:
        """Remove temporary files a killed writer left behind (readers never look at them)."""
        n = 0
        for table in ("cells", "fields", "failures"):
            base = join(self.root, table)
            if self.fs.exists(base):
                for p in self.fs.find(base):
                    if p.endswith(".tmp"):
                        self.fs.rm(p)
                        n += 1
        return n

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def remove(self, path: str) -> None:
        """Remove a file if it is there."""
        self.remove_many([path])

    def remove_many(self, paths: list[str]) -> None:
        """Remove files, in order, absent ones included; on an object store in bulk requests (s3fs: 1,000
        keys a DeleteObjects), not a check and a delete each."""
        if not is_local(self.url):
            if paths:
                retry(self.fs.rm, paths)
            return
        import os

        for p in paths:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass

    def parquet_files(self, base: str) -> list[str]:
        """The .parquet files under a folder (sorted; none when it is absent), each folder listed once.

        On a local disk the names come straight from each folder's listing, never checked one by one
        after it (fsspec's find stats every entry and drops those gone since): a compaction renaming
        its new part in and removing the old one while this lists shows one or the other, never neither.
        """
        if not is_local(self.url):
            if not self.fs.exists(base):
                return []
            found = {p: d.get("size") for p, d in self.fs.find(base, detail=True).items() if p.endswith(".parquet")}
            self.listed_sizes.update(found)
            return sorted(found)
        import os

        return sorted(os.path.join(d, f) for d, _, names in os.walk(base) for f in names if f.endswith(".parquet"))

    def _keys(self, table: str) -> set[str]:
        """The keys (file names less .parquet) of a table's files, from one listing."""
        return {file_key(p) for p in self.parquet_files(join(self.root, table))}

    def failure_keys(self) -> set[str]:
        """Keys of the failures/ rows: a rerun removes a field's row only where there is one."""
        return self._keys("failures")

    def done_field_ids(self) -> set[str]:
        """field_ids whose fields/ row exists (a commit marker, or a row of a committed compacted part)."""
        return self.committed().done

    def committed(self, plate: str | None = None, well: str | None = None) -> Committed:
        """Which cells/ and fields/ files count, from one listing of each (see :class:`Committed`)."""
        parts = [f"plate={safe(plate)}"] + ([f"well={safe(well)}"] if well is not None else []) if plate else []
        for attempt in range(6):
            # Other processes write here (Ray workers, a compaction): s3fs's cached listings would be
            # stale, and readers that check a file first (pyarrow's datasets) would miss a file made since.
            self.fs.invalidate_cache()
            listed = {t: self.parquet_files(join(self.root, t, *parts)) for t in ("cells", "fields")}
            fields_parts = [p for p in listed["fields"] if is_part(p)]
            docs = read_documents(self, fields_parts) if fields_parts else []
            c = Committed.resolve(listed["cells"], listed["fields"], dict(zip(fields_parts, docs)))
            if all(d is not None for d in docs) and c.complete:
                return c
            # A compaction committed or cleaned up between the two listings, or between the listing and
            # the read: this view may lack a part's cells, or the fields a vanished part held. Again.
            time.sleep(0.02 * 2**attempt)
        return c

    def table_files(self, table: str) -> list[str]:
        """The files of a table that a reader should read: committed rows only, each exactly once."""
        if table not in ("cells", "fields"):
            return self.parquet_files(join(self.root, table))
        c = self.committed()
        return c.cells if table == "cells" else c.fields

    def read_table(self, table: str) -> pd.DataFrame:
        """A whole table (partition columns restored) as pandas; empty frame when absent."""
        import pyarrow.dataset as ds

        base = join(self.root, table)
        for attempt in range(6):
            files = self.table_files(table)
            if not files:
                return pd.DataFrame()
            part = None if table == "failures" else "hive"
            try:
                dataset = ds.dataset(files, filesystem=self.fs, format="parquet", partitioning=part,
                                     partition_base_dir=base)
                return dataset.to_table().to_pandas()
            except FileNotFoundError:  # a compaction removed a file since the listing: list again
                if attempt == 5:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    # ---------- run.json ----------
    def read_run(self) -> dict[str, Any] | None:
        p = join(self.root, "run.json")
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def write_run(self, run: dict[str, Any]) -> None:
        p = join(self.root, "run.json")
        tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open(tmp, "w") as f:
            json.dump(run, f, indent=2, default=str)
        self.fs.mv(tmp, p)

    # ---------- zarr ----------
    def zarr_store(self, plate: str):
        """A zarr v3 store for one plate on any fsspec filesystem."""
        url = self.plate_url(plate)
        if "://" not in url:
            return zarr.storage.LocalStore(url)
        return zarr.storage.FsspecStore.from_url(url, storage_options=self.storage_options)


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
    """What counts in cells/ and fields/, per the compaction protocol (:mod:`livecell_ray.compact`).

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

    @property
    def complete(self) -> bool:
        return not self.lacking_cells

    @classmethod
    def resolve(cls, cells: list[str], fields: list[str], part_docs: dict[str, bytes | None]) -> Committed:
        replaced: set[str] = set()
        held: dict[str, set[str]] = {}
        for path, doc in part_docs.items():
            if doc is None:  # removed since the listing: a compaction replaced it
                continue
            t = pq.read_table(io.BytesIO(doc), columns=["field_id"])
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
        lacking = [p for p in keep_fields if file_key(p) not in has_cells]
        docs = {p: d for p, d in part_docs.items() if d is not None and file_key(p) in kept}
        return cls(keep_cells, keep_fields, in_parts | own, kept, stale, orphans, lacking, docs)


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """A table as the bytes of one Parquet file, with extra schema metadata (provenance)."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    # No dictionary pages: a field's file has a few hundred distinct floats and a handful of constant
    # strings, which zstd packs as well; 0.79 instead of 1.21 ms for a field's cells, 13% fewer bytes.
    pq.write_table(table, buf, compression="zstd", use_dictionary=False)
    return buf.getvalue()


def _write_local(path: str, data: bytes) -> None:
    """A local file written whole or not at all: a temporary name, then rename(2), atomic on one filesystem.

    Plain system calls rather than fsspec's opener and a makedirs (a stat and an mkdir) before every
    file: about 0.3 of the 10 ms a field costs to measure and write. The folder is made only when
    opening finds it missing, so a folder removed mid-run is made again.
    """
    import os

    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(tmp, "wb")
    with f:
        f.write(data)
    _before_rename(tmp, path)
    os.replace(tmp, path)


def _before_rename(tmp: str, final: str) -> None:
    """Test hook: LIVECELL_RAY_CRASH_BEFORE_RENAME=1 kills the writer between write and rename."""
    import os

    if os.environ.get("LIVECELL_RAY_CRASH_BEFORE_RENAME") == "1":
        os.kill(os.getpid(), 9)


def fields_in_plate(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per plate: one row per (well, site) series with its row, column and timepoint count."""
    series = manifest.drop_duplicates(["plate", "well", "site"])
    return {p: g for p, g in series.groupby("plate")}


#: Plate group attribute holding each plate's site and time layout (see manifest.apply_layout).
LAYOUT_KEY = "livecell_ray_layout"


def read_layouts(outputs: Outputs, plates: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The site and time layout each plate already has in OUT; plates not there yet are left out.

    A rerun lays its fields out around these (manifest.apply_layout), so that new timepoints and new
    fields go to new places and what was written stays where it is.
    """
    out = {}
    for plate in plates:
        try:
            root = zarr.open_group(outputs.zarr_store(plate), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            continue
        layout = root.attrs.get(LAYOUT_KEY)
        if layout:
            out[str(plate)] = layout
    return out


def init_plates(outputs: Outputs, manifest: pd.DataFrame, pixel_size: float | None,
                provenance: dict[str, Any], layouts: dict[str, dict[str, Any]] | None = None) -> None:
    """Write the HCS plate, well, image and label group metadata (NGFF 0.5) before any field runs.

    A plate of thousands of fields has three groups per field: they are created together, concurrently,
    by one ``zarr.create_hierarchy`` (2,000 fields: 5.5 s on 2 CPUs, where one group at a time took 33 s),
    and only where missing, so a rerun (0.8 s) does not rewrite what is there.
    """
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_plate_metadata, write_well_metadata
    from zarr.core.group import GroupMetadata

    fmt = FormatV05()
    # ome-zarr writes the well metadata (so it stays the authority on its form) into this scratch group.
    scratch = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    layouts = layouts if layouts is not None else apply_layout(manifest, {})[1]
    for plate, series in fields_in_plate(manifest).items():
        store = outputs.zarr_store(plate)
        root = zarr.open_group(store, mode="a", zarr_format=3)
        # Wells and sites: every one the plate has, from earlier runs too, not only this manifest's.
        layout = layouts[plate]
        when = time_axis(layout["timepoints"])
        label = {"version": "0.5", "multiscales": [_multiscales("cells", pixel_size, when)],
                 "image-label": {"version": "0.5", "source": {"image": "../../"}}}
        all_sites = {w: sorted(s.values(), key=int) for w, s in layout["sites"].items()}
        where = {w: parse_well(w) for w in all_sites}
        rows = sorted({r for r, _ in where.values()}, key=lambda r: (len(r), r))
        cols = sorted({c for _, c in where.values()})
        wells = sorted(where.values(), key=lambda rc: (rows.index(rc[0]), rc[1]))
        write_plate_metadata(root, rows, [str(c) for c in cols], [f"{r}/{c}" for r, c in wells],
                             fmt=fmt, field_count=max(len(s) for s in all_sites.values()), name=plate)
        before = root.attrs.get(LAYOUT_KEY) or {}
        root.attrs["livecell_ray"] = provenance
        have = _existing_groups(outputs, plate)
        images = [p[: -len("/labels/cells")] for p in have if p.endswith("/labels/cells")]  # written before
        if len(before.get("timepoints", [])) < len(layout["timepoints"]):
            # The time axis grew: every series gets its new (empty) planes, also those with no image at the
            # new timepoints, so the plate's images keep one (t, y, x) shape as NGFF viewers expect.
            _grow_time_axis(store, [f"{i}/{a}" for i in images for a in _FIELD_ARRAYS],
                            len(layout["timepoints"]))
        if before and time_axis(before.get("timepoints", [])) != when:
            # What one t index means changed (the second timepoint gave the interval, or one came out of
            # order): every image and label group written before says so too.
            _retime(store, [g for i in images for g in (i, f"{i}/labels/cells")], when)
        nodes: dict[str, GroupMetadata] = {}
        for (well_name, r, c), sites in series.groupby(["well", "row", "column"])["site"]:
            well = f"{r}/{c}"
            new = [s for s in sites if f"{well}/{s}/labels/cells" not in have]
            if not new:
                continue
            write_well_metadata(scratch, [{"path": s, "acquisition": 0} for s in all_sites[well_name]], fmt=fmt)
            if well in have:  # a well that gains sites: its metadata in place
                zarr.open_group(store, path=well, mode="r+", zarr_format=3).attrs.put(scratch.attrs.asdict())
            else:
                nodes[well] = GroupMetadata(attributes=scratch.attrs.asdict())
            for s in new:
                wanted = {f"{well}/{s}": {"version": "0.5",
                                          "multiscales": [_multiscales(f"{r}{c}/{s}", pixel_size, when)]},
                          f"{well}/{s}/labels": {"version": "0.5", "labels": ["cells"]},
                          f"{well}/{s}/labels/cells": label}
                nodes.update({k: GroupMetadata(attributes={"ome": v}) for k, v in wanted.items() if k not in have})
        if nodes:
            # Implicit parents (row groups) are added where missing; existing ones are left as they are.
            retry(lambda nodes=nodes, store=store: list(zarr.create_hierarchy(store=store, nodes=nodes)))
        # The layout last: a call cut short before this point (and retried, or rerun) still sees the old
        # layout, so it grows the arrays again rather than skipping them.
        root.attrs[LAYOUT_KEY] = layout


def _grow_time_axis(store: Any, paths: list[str], n: int) -> None:
    """Lengthen the t axis of these arrays (where they exist and are shorter) to n, concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    def grow(path: str) -> None:
        try:
            _lengthen_time_axis(_open_array(store, path), n)
        except FileNotFoundError:
            return  # a site whose first field has not been written yet

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(grow, paths))


def _existing_groups(outputs: Outputs, plate: str) -> set[str]:
    """Paths of the plate's well, image, labels and labels/cells groups that exist (one listing each)."""
    base = outputs.plate_path(plate)
    outputs.fs.invalidate_cache()  # object stores' listings are cached per filesystem instance: list afresh
    if not outputs.fs.exists(base):
        return set()
    found: set[str] = set()
    for pattern in ("*/*", "*/*/*", "*/*/*/labels", "*/*/*/labels/cells"):
        for hit in outputs.fs.glob(join(base, pattern, "zarr.json")):
            found.add(hit.rstrip("/")[len(base.rstrip("/")) + 1:-len("/zarr.json")])
    return found


def time_axis(hours: list[float]) -> tuple[float, float] | None:
    """The t axis as NGFF can state it: (hours per t index, hour of index 0) while the plate's timepoints
    are evenly spaced in index order (one timepoint: 1 h per index from its hour); None when they are
    not (a timepoint that arrived after later ones), where t is only an index and the plate's
    ``livecell_ray_layout`` attribute gives each index's hour."""
    if len(hours) < 2:
        return (1.0, float(hours[0]) if hours else 0.0)
    step = float(hours[1]) - float(hours[0])
    even = step > 0 and all(abs(float(h) - float(hours[0]) - i * step) <= 1e-6 * max(1.0, i * step)
                            for i, h in enumerate(hours))
    return (step, float(hours[0])) if even else None


def _multiscales(name: str, pixel_size: float | None, when: tuple[float, float] | None = (1.0, 0.0)) -> dict[str, Any]:
    unit = "micrometer" if pixel_size else None
    axes = [{"name": "t", "type": "time"},
            {"name": "y", "type": "space", **({"unit": unit} if unit else {})},
            {"name": "x", "type": "space", **({"unit": unit} if unit else {})}]
    s = float(pixel_size or 1.0)
    ms = {"name": name, "axes": axes,
          "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, s, s]}]}]}
    return _with_time(ms, when)


def _with_time(ms: dict[str, Any], when: tuple[float, float] | None) -> dict[str, Any]:
    """A multiscales entry with its t axis set by :func:`time_axis` (hours, or a bare index); the spatial
    axes and scales are left as they are."""
    ms = json.loads(json.dumps(ms))
    ms["axes"][0] = {"name": "t", "type": "time", **({"unit": "hour"} if when else {})}
    step, start = when or (1.0, 0.0)
    for d in ms["datasets"]:
        spatial = [t for t in d["coordinateTransformations"] if t["type"] == "scale"][0]["scale"][1:]
        d["coordinateTransformations"] = [{"type": "scale", "scale": [step, *spatial]}]
        if start:
            d["coordinateTransformations"].append({"type": "translation", "translation": [start, 0.0, 0.0]})
    return ms


def _retime(store: Any, paths: list[str], when: tuple[float, float] | None) -> None:
    """Set the t axis of these image and label groups' multiscales, concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> None:
        group = zarr.open_group(store, path=path, mode="r+", zarr_format=3)
        ome = dict(group.attrs["ome"])
        ome["multiscales"] = [_with_time(m, when) for m in ome["multiscales"]]
        retry(lambda: group.attrs.put({**group.attrs.asdict(), "ome": ome}))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, paths))


#: Chunks are compressed with zstd level 1: the same size as zarr's default (level 3) on label and
#: phase-contrast planes, at two thirds of the CPU time (2.5 vs 3.4 ms a label chunk).
CHUNK_ZSTD_LEVEL = 1


@functools.lru_cache(maxsize=32)
def array_document(shape: tuple[int, ...], dtype: str) -> bytes:
    """The zarr.json of a (t, y, x) array chunked one field-timepoint per chunk, written by zarr itself.

    Made once per shape and reused: creating each field's arrays through zarr (existence checks of the
    path and its parents, then the write) cost 2 x 2.3 ms a field, a tenth of measuring and writing it.
    """
    from zarr.codecs import ZstdCodec
    from zarr.core.buffer import default_buffer_prototype

    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, chunks=(1, *shape[1:]), dtype=dtype,
                            fill_value=0, dimension_names=("t", "y", "x"),
                            compressors=ZstdCodec(level=CHUNK_ZSTD_LEVEL))
    return arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


@functools.cache
def _reads_in_pieces(fs_type: type) -> bool:
    """Whether this filesystem's whole-file read takes max_concurrency (s3fs: size first, then pieces)."""
    return "max_concurrency" in inspect.signature(getattr(fs_type, "_cat_file", fs_type.cat_file)).parameters


def read_documents(outputs: Outputs, docs: list[str]) -> list[bytes | None]:
    """Several small metadata files in one go (concurrent requests on an object store); None if absent."""
    # cat_ranges: concurrent GETs on an async filesystem, and no existence checks first (cat has them).
    # s3fs also asks for a file's size (a HEAD, and a LIST when absent) before a whole-file GET unless
    # told to read it in one piece: one round trip instead of two.
    single = {"max_concurrency": 1} if _reads_in_pieces(type(outputs.fs)) else {}
    got = outputs.fs.cat_ranges(docs, None, None, on_error="return", **single)
    out: list[bytes | None] = []
    for doc, value in zip(docs, got):
        if isinstance(value, FileNotFoundError):
            out.append(None)
        elif isinstance(value, bytes):
            out.append(value)
        else:  # a transient error (or a key spelt otherwise): this one again, alone, with backoff
            try:
                out.append(retry(outputs.fs.cat_file, doc))
            except FileNotFoundError:
                out.append(None)
    return out


def _require_array(outputs: Outputs, plate: str, path: str, shape: tuple[int, ...], dtype: np.dtype,
                   document: bytes | None, new_files: dict[str, bytes]) -> bool:
    """Make sure the (t, y, x) array at path exists with this field's size and at least shape[0] timepoints.

    ``document`` is its zarr.json as read (None: absent), so no zarr.open_array machinery; its groups
    exist (init_plates), so creating it is writing its zarr.json, which goes into ``new_files`` to be
    written with the chunks. Several writers may race to create the same array (timepoints of one
    series): they write identical bytes, each atomically. Returns whether the array is laid out as
    ``array_document`` makes it (so its chunks can be written directly); arrays from elsewhere are not.
    """
    if document is None:
        new_files[join(outputs.plate_path(plate), path, "zarr.json")] = array_document(tuple(shape), dtype.str)
        return True
    meta = json.loads(document)
    have = tuple(meta["shape"])
    if have[1:] != tuple(shape[1:]):
        raise ValueError(f"array {path} has shape {have}, this field needs {tuple(shape)} "
                         f"(all timepoints of a field must have one size)")
    if have[0] < shape[0]:
        # The plate's time axis grew since the array was made (a time-lapse processed as it is imaged).
        _lengthen_time_axis(_open_array(outputs.zarr_store(plate), path), shape[0])
    ours = json.loads(array_document(have, dtype.str))
    return all(meta.get(k) == ours[k] for k in ours if k not in ("shape", "attributes"))


def _encode_chunk(plane: np.ndarray) -> bytes:
    """One chunk's bytes as ``array_document``'s codecs make them: C-order little-endian bytes, then zstd."""
    import numcodecs

    little = np.ascontiguousarray(plane, dtype=plane.dtype.newbyteorder("<"))
    return numcodecs.Zstd(level=CHUNK_ZSTD_LEVEL, checksum=False).encode(little)


def _open_array(store: Any, path: str) -> zarr.Array:
    """An existing array of the plate, for writing (its path known: one metadata read)."""
    return retry(zarr.open_array, store, path=path, mode="r+", zarr_format=3)


def _lengthen_time_axis(arr: zarr.Array, n: int) -> zarr.Array:
    """Grow a (t, y, x) array's t axis to n if shorter: only zarr.json changes, and writers racing here all
    grow it to the same length."""
    if arr.shape[0] < n:
        retry(arr.resize, (n, *arr.shape[1:]))
    return arr


#: A field's two arrays under its image path: the image the model saw, and its instance labels.
_FIELD_ARRAYS = ("0", "labels/cells/0")


def _mask_arrays(row: str, column: int, site: str) -> tuple[str, str, str]:
    """A field's image path in the plate, and its image and labels arrays under it (NGFF HCS layout)."""
    image_path = f"{row}/{column}/{site}"
    return image_path, *(f"{image_path}/{a}" for a in _FIELD_ARRAYS)


def mask_documents(outputs: Outputs, plate: str, row: str, column: int, site: str) -> list[str]:
    """The zarr.json of a field's image and labels arrays (what :func:`mask_files` needs read)."""
    return [join(outputs.plate_path(plate), path, "zarr.json") for path in _mask_arrays(row, column, site)[1:]]


def mask_files(outputs: Outputs, plate: str, row: str, column: int, site: str, t_index: int,
               n_timepoints: int, image: np.ndarray, labels: np.ndarray,
               documents: list[bytes | None] | None = None) -> tuple[str, dict[str, bytes]]:
    """One field-timepoint's image and labels as the files to write: (zarr path, {path: bytes}).

    Each plane is one whole chunk, encoded here and written as a file (one atomic write, so a retry
    rewrites a chunk whole): through zarr's array API the two writes cost 7 ms a field, mostly its
    event loop and metadata handling, against 1.8 ms for the same bytes. zarr reads them
    (``tests/test_store.py``). ``documents``: the two arrays' zarr.json as :func:`read_documents` gave
    them for :func:`mask_documents` (read here when None). An array laid out by another tool is
    written through zarr here and has no files in the result.
    """
    image_path, image_array, labels_array = _mask_arrays(row, column, site)
    shape = (n_timepoints, *labels.shape)
    base = outputs.plate_path(plate)
    planes = ((image_array, image.astype(np.uint8, copy=False)), (labels_array, labels.astype(np.uint32, copy=False)))
    if documents is None:
        documents = read_documents(outputs, mask_documents(outputs, plate, row, column, site))
    files: dict[str, bytes] = {}
    for (path, plane), document in zip(planes, documents):
        if _require_array(outputs, plate, path, shape, plane.dtype, document, files):
            # The default chunk key encoding, "/" separated: c/<t>/0/0 holds timepoint t.
            files[join(base, path, "c", str(t_index), "0", "0")] = _encode_chunk(plane)
        else:
            retry(_open_array(outputs.zarr_store(plate), path).__setitem__, t_index, plane)
    return image_path, files


def write_masks(outputs: Outputs, plate: str, row: str, column: int, site: str, t_index: int,
                n_timepoints: int, image: np.ndarray, labels: np.ndarray) -> str:
    """Write one field-timepoint's image and labels (see :func:`mask_files`); returns the zarr path."""
    image_path, files = mask_files(outputs, plate, row, column, site, t_index, n_timepoints, image, labels)
    outputs.write_many(files)
    return image_path


def read_labels(outputs: Outputs, plate: str, zarr_path: str, t_index: int) -> np.ndarray:
    """One stored label image (for checks, reports and queries)."""
    root = zarr.open_group(outputs.zarr_store(plate), mode="r", zarr_format=3)
    return np.asarray(root[f"{zarr_path}/labels/cells/0"][t_index])


def read_image(outputs: Outputs, plate: str, zarr_path: str, t_index: int) -> np.ndarray:
    """One stored (normalised) image."""
    root = zarr.open_group(outputs.zarr_store(plate), mode="r", zarr_format=3)
    return np.asarray(root[f"{zarr_path}/0"][t_index])


def table_from_columns(columns: dict[str, Iterable[Any]]) -> pa.Table:
    """pyarrow table from a dict of equal-length columns."""
    return pa.table({k: pa.array(np.asarray(v) if isinstance(v, np.ndarray) else list(v))
                     for k, v in columns.items()})
