"""Fields of a run picked for correcting, written as napari opens them with no plugin of ours: the round trip
of a human-in-the-loop model (run the generalist, correct a few fields, train on them, run the plate again).

Each picked field becomes ``DIR/<plate>_<well>_s<site>_<t>h/`` with ``image.tif`` (the instrument's plane,
its dtype, its pixel size as ImageJ resolution) and ``labels.tif`` (the run's instance labels), plus
``DIR/curate.json`` naming where each came from. ``napari DIR/F/image.tif DIR/F/labels.tif`` (or dragging
both in, the second as labels) opens them; the corrected labels layer is saved over ``labels.tif`` and
``livecell-ray train --data DIR`` reads the folder back (:func:`livecell_ray.training.dataset.read_labelled`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from livecell_ray.training.dataset import CURATED_IMAGE, CURATED_LABELS


def pick(fields: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` fields worth correcting: the least confident first (a field's mean cell confidence; a field
    where nothing was found counts as least confident), spread over wells (one a well in turn, wells in
    order of their least confident field) and, within a well, over timepoints (a timepoint not yet
    picked first)."""
    if n <= 0 or fields.empty:
        return fields.head(0)
    f = fields.assign(mean_confidence=fields["mean_confidence"].fillna(0.0))
    f = f.sort_values(["mean_confidence", "field_id"]).reset_index(drop=True)
    wells = list(dict.fromkeys(zip(f["plate"], f["well"])))  # in order of their least confident field
    left = {w: f[(f["plate"] == w[0]) & (f["well"] == w[1])].index.tolist() for w in wells}
    times: dict[tuple[str, str], set[float]] = {w: set() for w in wells}
    chosen: list[int] = []
    while len(chosen) < n and any(left.values()):
        for w in wells:
            if len(chosen) == n or not left[w]:
                continue
            fresh = [i for i in left[w] if f.at[i, "timepoint_h"] not in times[w]]
            i = (fresh or left[w])[0]
            left[w].remove(i)
            times[w].add(f.at[i, "timepoint_h"])
            chosen.append(i)
    return f.loc[chosen].reset_index(drop=True)


def folder_name(row: Any) -> str:
    from livecell_ray.store import safe

    return safe(f"{row['plate']}_{row['well']}_s{row['site']}_{row['timepoint_h']:g}h")


def curate(out: str, dest: str, n: int, storage_options: dict[str, Any] | None = None,
           where: str | None = None) -> pd.DataFrame:
    """Write ``n`` picked fields of the run in ``out`` to ``dest`` (see the module); returns what was written.
    ``where``: a SQL filter on the fields (e.g. "cell_type = 'HeLa'")."""
    import tifffile

    from livecell_ray import store
    from livecell_ray.answers.query import open_results

    res = open_results(out, storage_options)
    fields = res.df(
        "SELECT f.field_id, f.path, f.plate, f.well, f.site, f.timepoint_h, f.t_index, f.zarr_path, f.n_cells, "
        "f.cell_type, c.mean_confidence, c.um_per_px FROM fields f LEFT JOIN (SELECT field_id, "
        "avg(confidence) AS mean_confidence, median(sqrt(area_um2 / area_px)) AS um_per_px FROM cells "
        "GROUP BY field_id) c USING (field_id)" + (f" WHERE {where}" if where else ""))
    picked = pick(fields, n)
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for row in picked.to_dict("records"):
        inner = row["zarr_path"].split(".zarr/", 1)[1]
        image = store.read_image(res.outputs, row["plate"], inner, int(row["t_index"]))
        labels = store.read_labels(res.outputs, row["plate"], inner, int(row["t_index"]))
        labels = labels.astype(np.uint16 if labels.max() < 2**16 else np.uint32)
        sub = root / folder_name(row)
        sub.mkdir(exist_ok=True)
        px = row["um_per_px"]
        meta = ({"resolution": (1 / px, 1 / px), "imagej": True, "metadata": {"unit": "um"}}
                if px is not None and np.isfinite(px) and px > 0 else {})
        tifffile.imwrite(sub / CURATED_IMAGE, image, **meta)
        tifffile.imwrite(sub / CURATED_LABELS, labels, **meta)
        records.append({"folder": sub.name, "field_id": row["field_id"], "source": row["path"],
                        "plate": row["plate"], "well": row["well"], "site": row["site"],
                        "timepoint_h": row["timepoint_h"], "cell_type": row["cell_type"],
                        "n_cells": int(row["n_cells"]),
                        "mean_confidence": float(row["mean_confidence"]),
                        "pixel_size_um": None if not meta else float(px)})
    (root / "curate.json").write_text(json.dumps({"out": out, "fields": records}, indent=1) + "\n")
    return pd.DataFrame(records)
