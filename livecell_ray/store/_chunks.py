"""Zarr arrays of a field written directly: their zarr.json documents and chunks encoded as zarr would."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from livecell_ray.retry import retry
from livecell_ray.store._files import Outputs, is_local, join, read_documents, safe

#: Chunks are compressed with zstd level 1: the same size as zarr's default (level 3) on label and
#: phase-contrast planes, at two thirds of the CPU time (2.5 vs 3.4 ms a label chunk).
CHUNK_ZSTD_LEVEL = 1


#: The image array's attribute saying that it holds the instrument's values (output format 0.3 on); an image
#: array without it holds the normalised uint8 plane of format 0.2.
INSTRUMENT = {"livecell_ray": {"values": "instrument"}}


@functools.lru_cache(maxsize=32)
def array_document(shape: tuple[int, ...], dtype: str, chunk: int | None = None, image: bool = False) -> bytes:
    """The zarr.json of a (t, y, x) array chunked one field-timepoint per chunk (``chunk``: in chunk x chunk
    squares, for a field streamed a band of rows at a time), written by zarr itself.

    Made once per shape and reused: creating each field's arrays through zarr (existence checks of the
    path and its parents, then the write) cost 2 x 2.3 ms a field, a tenth of measuring and writing it.
    """
    from zarr.codecs import ZstdCodec
    from zarr.core.buffer import default_buffer_prototype

    chunks = (1, *shape[1:]) if chunk is None else (1, min(chunk, shape[1]), min(chunk, shape[2]))
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, chunks=chunks, dtype=dtype,
                            fill_value=0, dimension_names=("t", "y", "x"),
                            compressors=ZstdCodec(level=CHUNK_ZSTD_LEVEL), attributes=INSTRUMENT if image else None)
    return arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _require_array(outputs: Outputs, plate: str, path: str, shape: tuple[int, ...], dtype: np.dtype,
                   document: bytes | None, new_files: dict[str, bytes], chunk: int | None = None) -> bool:
    """Make sure the (t, y, x) array at path exists with this field's size and at least shape[0] timepoints.

    ``document`` is its zarr.json as read (None: absent), so no zarr.open_array machinery; its groups
    exist (init_plates), so creating it is writing its zarr.json, which goes into ``new_files`` to be
    written with the chunks. Several writers may race to create the same array (timepoints of one
    series): they write identical bytes, each atomically. Returns whether the array is laid out as
    ``array_document`` makes it (so its chunks can be written directly); arrays from elsewhere are not.
    """
    if document is None:
        image = "/labels/" not in path  # a field's image array, not its labels
        new_files[join(outputs.plate_path(plate), path, "zarr.json")] = array_document(tuple(shape), dtype.str, chunk,
                                                                                       image)
        return True
    meta = json.loads(document)
    have = tuple(meta["shape"])
    if have[1:] != tuple(shape[1:]):
        raise ValueError(f"{shape[2]}x{shape[1]} px, but its field (array {path}) is {have[2]}x{have[1]} px at "
                         f"another timepoint: every timepoint of a field must have one size")
    if have[0] < shape[0]:
        # The plate's time axis grew since the array was made (a time-lapse processed as it is imaged).
        _lengthen_time_axis(_open_array(outputs.zarr_store(plate), path), shape[0])
    ours = json.loads(array_document(have, dtype.str, chunk))
    return all(meta.get(k) == ours[k] for k in ours if k not in ("shape", "attributes"))


def _image_plane(plane: np.ndarray, document: bytes | None, normalised: np.ndarray | None, path: str) -> np.ndarray:
    """The plane to store in a field's image array: the instrument's own values in their own dtype; for an
    array an earlier output format (0.2) made uint8 from the normalised plane, that plane, so one series keeps
    one meaning; a dtype the array cannot hold (a series whose timepoints were saved at different depths) is
    refused, never cast into garbage."""
    plane = plane.astype(plane.dtype.newbyteorder("="), copy=False)
    if document is None:
        return plane
    meta = json.loads(document)
    if normalised is not None and "livecell_ray" not in (meta.get("attributes") or {}):  # made by format 0.2
        return normalised.astype(np.uint8, copy=False)
    stored = np.dtype(meta.get("data_type", plane.dtype.name))
    if stored == plane.dtype:
        return plane
    if np.can_cast(plane.dtype, stored, "safe"):
        return plane.astype(stored)
    raise ValueError(f"the image is {plane.dtype}, but its field's image array ({path}) is {stored} from another "
                     f"timepoint: every timepoint of a field must be saved at one bit depth")


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
               documents: list[bytes | None] | None = None, normalised: np.ndarray | None = None
               ) -> tuple[str, dict[str, bytes]]:
    """One field-timepoint's image (the instrument's values, see :func:`_image_plane`; ``normalised``: the
    model's uint8 plane, for arrays of output format 0.2) and labels as the files to write: (zarr path,
    {path: bytes}).

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
    if documents is None:
        documents = read_documents(outputs, mask_documents(outputs, plate, row, column, site))
    planes = ((image_array, _image_plane(np.asarray(image), documents[0], normalised, image_array)),
              (labels_array, labels.astype(np.uint32, copy=False)))
    files: dict[str, bytes] = {}
    for (path, plane), document in zip(planes, documents):
        if _require_array(outputs, plate, path, shape, plane.dtype, document, files):
            # The default chunk key encoding, "/" separated: c/<t>/0/0 holds timepoint t.
            files[join(base, path, "c", str(t_index), "0", "0")] = _encode_chunk(plane)
        else:
            retry(_open_array(outputs.zarr_store(plate), path).__setitem__, t_index, plane)
    return image_path, files


def chunk_files(outputs: Outputs, plate: str, row: str, column: int, site: str, t_index: int) -> list[str]:
    """The chunk files of one field-timepoint in both its arrays (one whole-field chunk each, or a streamed
    field's squares), from one listing of each, to remove it."""
    base = outputs.plate_path(plate)
    found = []
    for path in _mask_arrays(row, column, site)[1:]:
        folder = join(base, path, "c", str(t_index))
        if outputs.fs.exists(folder):
            found += sorted(outputs.fs.find(folder))
    return found


def stream_writer(outputs: Outputs, plate: str, row: str, column: int, site: str, t_index: int,
                  n_timepoints: int, shape: tuple[int, int], chunk: int, dtype: np.dtype = np.dtype(np.uint8)
                  ) -> tuple[str, Callable[[int, np.ndarray, np.ndarray, np.ndarray | None], None]]:
    """A streamed field's image (``dtype``: the instrument's) and labels, written a chunk row at a time: (zarr
    path, write(y, image rows, label rows, normalised rows)), ``y`` a multiple of ``chunk`` and the rows
    ``chunk`` of them (fewer at the field's end); the normalised rows are stored only in an image array of
    output format 0.2 (:func:`_image_plane`).

    Its arrays are chunked in ``chunk`` squares, so that no chunk needs the field whole; each chunk is a
    file written whole (zarr stores edge chunks padded to the full square). An array laid out otherwise
    (by an earlier run of other settings, or another tool) is written through zarr.
    """
    image_path, *arrays = _mask_arrays(row, column, site)
    full = (n_timepoints, *shape)
    base = outputs.plate_path(plate)
    documents = read_documents(outputs, mask_documents(outputs, plate, row, column, site))
    files: dict[str, bytes] = {}
    probe = _image_plane(np.zeros((1, 1), dtype), documents[0], np.zeros((1, 1), np.uint8), arrays[0])
    direct = [_require_array(outputs, plate, path, full, np.dtype(dt), doc, files, chunk)
              for path, dt, doc in zip(arrays, (probe.dtype, np.uint32), documents)]
    outputs.write_many(files)

    def write(y: int, image: np.ndarray, labels: np.ndarray, normalised: np.ndarray | None = None) -> None:
        out: dict[str, bytes] = {}
        stored = _image_plane(image, documents[0], normalised, arrays[0])
        for path, plane, ours in zip(arrays, (stored, labels.astype(np.uint32)), direct):
            if not ours:
                retry(_open_array(outputs.zarr_store(plate), path).__setitem__,
                      (t_index, slice(y, y + plane.shape[0])), plane)
                continue
            for j, x in enumerate(range(0, shape[1], chunk)):
                square = np.zeros((min(chunk, shape[0]), min(chunk, shape[1])), plane.dtype)
                part = plane[:, x:x + chunk]
                square[:part.shape[0], :part.shape[1]] = part
                out[join(base, path, "c", str(t_index), str(y // chunk), str(j))] = _encode_chunk(square)
        outputs.write_many(out)

    return image_path, write


def make_folders(outputs: Outputs, fields: Any) -> int:
    """On a local OUT, the folders that these fields' files will go to (their chunks' c/<t>/0 under both
    arrays, their wells' table partitions), made all at once; returns how many leaf folders.

    Each field would otherwise make about ten nested folders as it is written (each after a failed open),
    a third of the CPU time of measuring and writing it on an ext4 disk; made here, by the driver while the
    model replicas start, they cost the shards nothing. Object stores have no folders: nothing to do there.
    """
    if not is_local(outputs.url):
        return 0
    import os

    leaves = set()
    for plate, row, column, site, t in zip(fields["plate"], fields["row"], fields["column"], fields["site"],
                                           fields["t_index"]):
        base = outputs.plate_path(plate)
        for array in _mask_arrays(str(row), int(column), str(site))[1:]:
            leaves.add(join(base, array, "c", str(int(t)), "0"))
    for plate, well in set(zip(fields["plate"], fields["well"])):
        leaves.update(os.path.dirname(outputs.table_path(t, plate, well, "x")) for t in ("cells", "fields"))
    for leaf in sorted(leaves):
        os.makedirs(leaf, exist_ok=True)
    return len(leaves)


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
    """One stored image, in the instrument's values (output format 0.2: the normalised plane)."""
    root = zarr.open_group(outputs.zarr_store(plate), mode="r", zarr_format=3)
    return np.asarray(root[f"{zarr_path}/0"][t_index])




def field_zarr_path(plate: str, row: str, column: int, site: str) -> str:
    """A field's image group relative to OUT, as the fields table's ``zarr_path`` column gives it."""
    return f"masks/{safe(plate)}.zarr/{_mask_arrays(row, column, site)[0]}"
