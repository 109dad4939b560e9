"""Where results live: OME-NGFF 0.5 HCS plates in Zarr v3, Parquet tables, run.json.

Layout under OUT (an fsspec URL)::

    masks/<plate>.zarr/<row>/<col>/<site>/0                 image as the instrument wrote it, its dtype (t, y, x)
    masks/<plate>.zarr/<row>/<col>/<site>/labels/cells/0    instance labels, uint32 (t, y, x)
    cells/plate=<p>/well=<w>/<field_id>.parquet              one row per cell
    fields/plate=<p>/well=<w>/<field_id>.parquet             one row per field-timepoint (commit marker)
    failures/<key>.parquet                                   one row per input that failed
    run.json                                                 provenance and counts

One private module per concern, the public names re-exported here:

- ``_files``: paths, atomic writes and listings on any fsspec filesystem (:class:`Outputs`);
- ``_commit``: which table files count (:class:`Committed`, the compaction protocol's reader side);
- ``_ngff``: plate, well, image and label group metadata, the plate's layout and time axis;
- ``_chunks``: a field's arrays written directly, chunks encoded as their ``zarr.json`` says;
- ``_write``: a block of measured fields written and committed in one call (:func:`write_block`);
- ``_lease``: one writer at a time per OUT (:func:`acquire`), with expiry and a fencing token;
- ``compact``: each well's per-field Parquet files merged into one part (its own public module).

May import: config, retry, plate (well names and the plate's layout). Never Ray, torch or the model side:
measuring and storing run in any CPU worker, and the answers read what is stored with neither.

A field counts as done exactly when its ``fields/`` file exists: it is written last, after the
masks and the cells, which makes a rerun resume without duplicates.
"""

from livecell_ray.retry import retry
from livecell_ray.store._chunks import (
    CHUNK_ZSTD_LEVEL,
    array_document,
    chunk_files,
    field_zarr_path,
    make_folders,
    mask_documents,
    mask_files,
    read_image,
    read_labels,
    stream_writer,
    write_masks,
)
from livecell_ray.store._commit import PART_PREFIX, SUPERSEDES_KEY, Committed, file_key, is_part
from livecell_ray.store._files import (
    Outputs,
    filesystem,
    is_local,
    join,
    parquet_bytes,
    read_documents,
    safe,
    table_from_columns,
    unwritable,
    unwritable_message,
)
from livecell_ray.store._lease import Lease, LeaseBusy, LeaseLost, acquire
from livecell_ray.store._ngff import LAYOUT_KEY, fields_in_plate, group_document, init_plates, read_layouts, time_axis
from livecell_ray.store._write import FieldResult, commit_tables, write_block

__all__ = [
    "Lease", "LeaseBusy", "LeaseLost", "acquire", "CHUNK_ZSTD_LEVEL", "LAYOUT_KEY", "PART_PREFIX", "SUPERSEDES_KEY",
    "Committed", "FieldResult", "Outputs", "array_document", "commit_tables", "field_zarr_path", "fields_in_plate",
    "file_key", "filesystem", "group_document", "init_plates", "is_local", "is_part", "join", "make_folders",
    "chunk_files", "mask_documents", "mask_files", "parquet_bytes", "read_documents", "read_image", "read_labels",
    "read_layouts", "retry", "safe", "stream_writer", "table_from_columns", "time_axis", "unwritable",
    "unwritable_message", "write_block", "write_masks",
]
