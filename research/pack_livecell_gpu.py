"""Pack the LIVECell noisy-student experiment's inputs small enough for one GPU call.
Question: do the 5 annotated LIVECell fields, Usiigaci at LIVECell's scale and 35 unlabelled fields fit one
call's transfer next to the repository? Figure: 20.8 MiB, normalised 8-bit planes, zlib TIFF (printed).

The lent machine has no imagecodecs (LIVECell's TIFFs are LZW) and carries 64 MiB with the working tree,
so the fields travel as their normalised 8-bit planes (normalising them again is the identity) and
Usiigaci already resized by 0.5. The starting weights are the Usiigaci-only `small.pt` (commit 01890f0),
which never saw a LIVECell cell: the folds can then hold a field out honestly.

    python research/pack_livecell_gpu.py .gpu
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from livecell_ray.plate.imaging import normalize, read_image
from livecell_ray.training import dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_gpu_data import write_field  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASE_COMMIT = "01890f0"  # the Usiigaci-only small.pt
HELD_OUT = {"set41", "set42", "set43", "set44", "set45"}


def pack(out: str) -> None:
    """out/lc (5 annotated fields), out/usi (Usiigaci sets 1-40 x0.5), out/unl (unlabelled), out/base.pt."""
    root = Path(out)
    lc = dataset.read_coco(DATA / "livecell/annotated/livecell_coco_val.json", DATA / "livecell/annotated/images")
    for f in lc:
        write_field(root / "lc" / f.name, f)
    for f in dataset.read_mask_folder(DATA / "usiigaci/train"):
        if f.name in HELD_OUT:  # scored here, after the call, never trained on
            continue
        write_field(root / "usi" / f.name, dataset.resize_field(f, 0.5))
    (root / "unl").mkdir(parents=True, exist_ok=True)
    # One well's time series is 15 of the 47 fields: 5 of them (one timepoint's four crops and one more)
    # carry its cells, the rest only its time.
    unl = [p for p in sorted((DATA / "livecell/unlabelled").glob("*.tif"))
           if not p.name.startswith("SkBr3_Phase_H3_2_") or p.name[17:26] in ("02d00h00m", "01d20h00m")]
    for p in unl:
        tifffile.imwrite(root / "unl" / p.name, normalize(read_image(str(p))), compression="zlib",
                         compressionargs={"level": 9})
    base = subprocess.run(["git", "show", f"{BASE_COMMIT}:weights/small.pt"], capture_output=True, check=True).stdout
    (root / "base.pt").write_bytes(base)
    back = {f.name: f for f in dataset.read_mask_folder(root / "lc")}
    if any(not np.array_equal(back[f.name].labels, f.labels) or not np.array_equal(back[f.name].image, f.image)
           for f in lc):
        raise SystemExit("packed LIVECell fields differ from the source")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"{len(lc)} annotated, {len(unl)} unlabelled fields packed into {out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    pack(sys.argv[1])
