"""Pack a Usiigaci-layout mask folder small enough to travel to a lent GPU machine.
Question: how does the training data fit one GPU call's transfer? Figure: 93 MB of raw fields -> 31 MB, bit-identical.

The raw 16-bit fields (93 MB) do not fit one call's 64 MiB working tree together with the project;
their normalised 8-bit planes (zlib TIFF, about 31 MB) do, and give bit-identical training data:
normalising an already normalised plane is the identity, and resizing happens after it.

    python research/pack_gpu_data.py ../shared/data/usiigaci/train .gpu/usiigaci
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from livecell_ray.training import dataset


def write_field(d: Path, f: dataset.LabelledField) -> None:
    """One field in the Usiigaci layout: d/raw.tif (its normalised uint8 plane, zlib) and instances_ids.png."""
    d.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(d / "raw.tif", f.image, compression="zlib", compressionargs={"level": 9})
    if f.labels.max() > 65535:
        raise ValueError(f"{f.name}: more than 65,535 instances")
    dtype = np.uint8 if f.labels.max() < 256 else np.uint16
    Image.fromarray(f.labels.astype(dtype)).save(d / "instances_ids.png", optimize=True)


def pack(src: str, dst: str) -> None:
    """Write dst/<field>/raw.tif (normalised uint8) and instances_ids.png, then check the round trip."""
    fields = dataset.read_mask_folder(src)
    for f in fields:
        write_field(Path(dst) / f.name, f)
    back = {b.name: b for b in dataset.read_mask_folder(dst)}
    for f in fields:
        same = np.array_equal(back[f.name].image, f.image) and np.array_equal(back[f.name].labels, f.labels)
        if not same:
            raise SystemExit(f"{f.name}: packed copy differs from the source")
    print(f"{len(fields)} fields packed into {dst}, identical after normalisation")


if __name__ == "__main__":
    pack(sys.argv[1], sys.argv[2])
