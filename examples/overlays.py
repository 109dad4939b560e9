"""Overlay PNGs (image + cell outlines) of the shipped model on the bundled LIVECell examples.

    python examples/overlays.py [--model small] [--out weights/overlays]

Runs the same Segmenter as ``livecell-ray segment`` on each example and draws the outlines, so the
model card can show what the weights do on real LIVECell fields (which carry no labels here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from livecell_ray.config import InferenceConfig  # noqa: E402
from livecell_ray.model import models  # noqa: E402
from livecell_ray.model.segment import Segmenter  # noqa: E402
from livecell_ray.plate.imaging import normalize, read_image  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="small")
    ap.add_argument("--out", default=str(HERE.parent / "weights" / "overlays"))
    ap.add_argument("--imgsz", type=int, default=InferenceConfig().imgsz)
    a = ap.parse_args()
    seg = Segmenter(models.resolve_map(a.model, trust=True), InferenceConfig(imgsz=a.imgsz))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted((HERE / "livecell_plate").glob("*.tif")):
        img = normalize(read_image(str(p)))
        r = seg([img], [p.name.split("_")[0]])[0]
        rgb = np.repeat(img[..., None], 3, axis=2).copy()
        rgb[find_boundaries(r.labels, mode="inner")] = (255, 40, 40)
        fig, ax = plt.subplots(figsize=(7.04, 5.6), dpi=100)
        ax.imshow(rgb)
        ax.set_title(f"{p.stem}: {int(r.labels.max())} cells", fontsize=9)
        ax.axis("off")
        fig.savefig(out / f"{p.stem}.png", bbox_inches="tight")
        plt.close(fig)
        print(f"{p.name}: {int(r.labels.max())} cells -> {out / (p.stem + '.png')}")


if __name__ == "__main__":
    main()
