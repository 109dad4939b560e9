"""NGFF 0.5 HCS plate metadata: plate, well, image and label groups, the plate's layout and time axis."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import zarr

from livecell_ray.retry import retry
from livecell_ray.store._chunks import _FIELD_ARRAYS, _lengthen_time_axis, _open_array
from livecell_ray.store._files import Outputs, join

if TYPE_CHECKING:  # pandas and the manifest: the driver's, never imported by the workers that write fields
    import pandas as pd


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

    A plate of thousands of fields has three groups per field: their zarr.json documents (as zarr writes
    them, :func:`group_document`) are written together, as files (concurrently on an object store), and
    only where missing, so a rerun does not rewrite what is there; ``zarr.create_hierarchy`` did the
    same through zarr's event loop at twice the CPU time.
    """
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    fmt = FormatV05()
    # ome-zarr writes the well metadata (so it stays the authority on its form) into this scratch group.
    scratch = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    from livecell_ray.plate.manifest import apply_layout, parse_well

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
        nodes: dict[str, dict[str, Any]] = {}  # group path -> its attributes
        for (well_name, r, c), sites in series.groupby(["well", "row", "column"])["site"]:
            well = f"{r}/{c}"
            new = [s for s in sites if f"{well}/{s}/labels/cells" not in have]
            if not new:
                continue
            write_well_metadata(scratch, [{"path": s, "acquisition": 0} for s in all_sites[well_name]], fmt=fmt)
            if well in have:  # a well that gains sites: its metadata in place
                zarr.open_group(store, path=well, mode="r+", zarr_format=3).attrs.put(scratch.attrs.asdict())
            else:
                nodes[well] = scratch.attrs.asdict()
            for s in new:
                wanted = {f"{well}/{s}": {"version": "0.5",
                                          "multiscales": [_multiscales(f"{r}{c}/{s}", pixel_size, when)]},
                          f"{well}/{s}/labels": {"version": "0.5", "labels": ["cells"]},
                          f"{well}/{s}/labels/cells": label}
                nodes.update({k: {"ome": v} for k, v in wanted.items() if k not in have})
        if nodes:
            # Parents (row groups) are added where missing; existing ones are left as they are.
            nodes.update({r: {} for r in {n.split("/")[0] for n in nodes} - have})
            outputs.write_many({join(outputs.plate_path(plate), path, "zarr.json"): group_document(attrs)
                                for path, attrs in nodes.items()})
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


def group_document(attributes: dict[str, Any]) -> bytes:
    """A group's zarr.json, byte for byte as zarr writes it: zarr's own document of an empty group, with
    these attributes, dumped as zarr dumps it (its GroupMetadata costs 0.3 ms a group, a plate of 2,000
    fields has 8,000 of them)."""
    doc = {**_empty_group(), "attributes": attributes}
    return json.dumps(doc, indent=zarr.config.get("json_indent"), allow_nan=True).encode()


@functools.cache
def _empty_group() -> dict[str, Any]:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata

    return json.loads(GroupMetadata().to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


def _existing_groups(outputs: Outputs, plate: str) -> set[str]:
    """Paths of the plate's row, well, image, labels and labels/cells groups that exist (one listing each)."""
    base = outputs.plate_path(plate)
    outputs.fs.invalidate_cache()  # object stores' listings are cached per filesystem instance: list afresh
    if not outputs.fs.exists(base):
        return set()
    found: set[str] = set()
    for pattern in ("*", "*/*", "*/*/*", "*/*/*/labels", "*/*/*/labels/cells"):
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


