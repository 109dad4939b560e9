"""Three plates as instruments write them, made from the bundled LIVECell fields, for docs/plates.md.

    python examples/own_plates.py DIR

- DIR/incucyte: full 1408x1040 Incucyte S3 frames (2x2 of the bundled 704x520 crops), named as the
  Incucyte image export names them, two timepoints of two wells.
- DIR/imagexpress: an ImageXpress plate at 20x (each field 2x finer than LIVECell's 10x: 0.62 um/px),
  MetaXpress names, TimePoint_<n> folders, phase on wavelength 1 and another image on wavelength 2.
- DIR/stitched: one stitched well, 3000x3000 px, an OME-TIFF that records its pixel size (1.24 um/px).
The tests run docs/plates.md's commands on exactly these files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
FIELDS = sorted((HERE / "livecell_plate").glob("*.tif"))


def _fields() -> list[np.ndarray]:
    from livecell_ray.plate.imaging import read_image

    return [read_image(str(p)) for p in FIELDS]


def make(root: str | Path) -> dict[str, Path]:
    """Write the three plates under root; returns their folders."""
    root = Path(root)
    ims = _fields()
    frame = lambda k: np.block([[ims[k % 10], ims[(k + 1) % 10]], [ims[(k + 2) % 10], ims[(k + 3) % 10]]])  # noqa: E731
    inc = root / "incucyte"
    inc.mkdir(parents=True, exist_ok=True)
    for w, well in enumerate(("B3", "C4")):
        for t, hour in enumerate(("14h30m", "18h30m")):
            tifffile.imwrite(inc / f"VID1234_{well}_1_2024y03m05d_{hour}.tif", frame(4 * w + t))
    ixp = root / "imagexpress"
    for t in (1, 2):
        d = ixp / f"TimePoint_{t}"
        d.mkdir(parents=True, exist_ok=True)
        for s, well in enumerate(("B02", "B03")):
            phase = np.repeat(np.repeat(ims[(s + t) % 10], 2, axis=0), 2, axis=1)  # 20x: each pixel 2x2
            tifffile.imwrite(d / f"Screen1_{well}_s1_w1.tif", phase)
            tifffile.imwrite(d / f"Screen1_{well}_s1_w2.tif", np.repeat(np.repeat(ims[9 - s], 2, 0), 2, 1))
    st = root / "stitched"
    st.mkdir(parents=True, exist_ok=True)
    tiles = [[ims[(r * 5 + c) % 10] for c in range(5)] for r in range(6)]
    well = np.block(tiles)[:3000, :3000]
    tifffile.imwrite(st / "Stitched_Phase_A1_1_00d00h00m_1.ome.tif", well, ome=True,
                     metadata={"PhysicalSizeX": 1.24, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 1.24,
                               "PhysicalSizeYUnit": "µm"})
    return {"incucyte": inc, "imagexpress": ixp, "stitched": st}


if __name__ == "__main__":
    for name, path in make(sys.argv[1] if len(sys.argv) > 1 else "plates").items():
        print(f"{name}: {path}")
