"""Files under OUT on any fsspec filesystem: paths, atomic writes, listings, table reads, run.json.

Every file is written whole or not at all (a temporary name and a rename on a local disk, one PUT on
an object store), so a reader never sees half of one.
"""

from __future__ import annotations

import errno
import functools
import inspect
import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from livecell_ray.retry import retry
from livecell_ray.store._commit import Committed, file_key, is_part

if TYPE_CHECKING:  # the driver's and the queries'; the workers that write fields never import pandas
    import pandas as pd

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: Write errors that are OUT's, not a field's: every later write would fail the same way, so the run stops.
UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def unwritable(exc: BaseException) -> bool:
    """An error that says OUT itself cannot be written (full, over quota, read-only, not permitted)."""
    return isinstance(exc, OSError) and exc.errno in UNWRITABLE


def unwritable_message(out: str, exc: OSError) -> str:
    """One line for :func:`unwritable` errors: where, the cause by its errno name, and what to do."""
    name = errno.errorcode.get(exc.errno or 0, "")
    where = f" {exc.filename}" if exc.filename else ""
    return (f"{out}: cannot write{where} ({exc.strerror or os.strerror(exc.errno or 0)}, {name}); the fields "
            f"committed so far are kept: free space or make OUT writable, then run the same command again")


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


class Outputs:
    """Paths and atomic writers for one OUT location."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None):
        if "://" not in out:
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
        """Remove temporary files a killed or failed writer left behind (readers never look at them): in the
        tables, beside run.json and among the masks' chunks. Only a local OUT has any (an object store's
        PUT needs no temporary name), so only a local OUT's folders are walked."""
        if not is_local(self.url):
            return 0
        n = 0
        for top in ("cells", "fields", "failures", "masks", ""):
            base = join(self.root, top) if top else self.root
            for folder, dirs, names in os.walk(base):
                if not top:
                    dirs.clear()  # OUT itself: run.json's temporary names only, the rest walked above
                for name in names:
                    if name.endswith(".tmp"):
                        os.remove(os.path.join(folder, name))
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
        import pandas as pd
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
        try:
            with self.fs.open(p, "r") as f:
                run = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p}: damaged run.json, not valid JSON ({exc}); a rerun rewrites it from the "
                             f"fields' own metadata") from None
        if not isinstance(run, dict):
            raise ValueError(f"{p}: damaged run.json, a JSON {type(run).__name__} where an object belongs; a "
                             f"rerun rewrites it from the fields' own metadata")
        return run

    def read_run_or_empty(self) -> dict[str, Any]:
        """run.json for display (a report's header, the saved plate map's name): {} when absent or damaged."""
        try:
            return self.read_run() or {}
        except ValueError:
            return {}

    def write_run(self, run: dict[str, Any]) -> None:
        self.write_bytes(join(self.root, "run.json"), json.dumps(run, indent=2, default=str).encode())

    # ---------- zarr ----------
    def zarr_store(self, plate: str):
        """A zarr v3 store for one plate on any fsspec filesystem."""
        url = self.plate_url(plate)
        if "://" not in url:
            return zarr.storage.LocalStore(url)
        return zarr.storage.FsspecStore.from_url(url, storage_options=self.storage_options)


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
    A write that fails (a full disk, a read-only OUT) removes its temporary file where it can and raises
    with ``path``, the file meant, named; what it could not remove, the next run's clean_temporary does.
    """
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(tmp, "wb")
        with f:
            f.write(data)
        _before_rename(tmp, path)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(exc.errno, exc.strerror, path) from None


def _before_rename(tmp: str, final: str) -> None:
    """Test hook: LIVECELL_RAY_CRASH_BEFORE_RENAME=1 kills the writer between write and rename."""
    if os.environ.get("LIVECELL_RAY_CRASH_BEFORE_RENAME") == "1":
        os.kill(os.getpid(), 9)


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


def table_from_columns(columns: dict[str, Iterable[Any]]) -> pa.Table:
    """pyarrow table from a dict of equal-length columns."""
    return pa.table({k: pa.array(np.asarray(v) if isinstance(v, np.ndarray) else list(v))
                     for k, v in columns.items()})

