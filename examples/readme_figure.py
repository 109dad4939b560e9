"""README's picture: the shipped model's cells on one bundled field beside the example plate's cells per well.

    livecell-ray segment examples/livecell_plate out && python examples/readme_figure.py out [--png docs/overview.png]

Both panels come from the outputs of README's first command (the stored labels and the wells view),
so the picture shows what a user gets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

import livecell_ray  # noqa: E402
from livecell_ray import store  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="OUT of `livecell-ray segment examples/livecell_plate OUT`")
    ap.add_argument("--field", default="SkBr3_Phase_E3_2_02d08h00m_1", help="which field to overlay")
    ap.add_argument("--png", default=str(HERE.parent / "docs" / "overview.png"))
    a = ap.parse_args()
    res = livecell_ray.open_results(a.out)
    f = res.df(f"SELECT plate, zarr_path, t_index, n_cells FROM fields WHERE path LIKE '%{a.field}%'").iloc[0]
    zarr_path = f["zarr_path"].split(".zarr/", 1)[1]
    img = store.read_image(res.outputs, f["plate"], zarr_path, int(f["t_index"]))
    labels = store.read_labels(res.outputs, f["plate"], zarr_path, int(f["t_index"]))
    rgb = np.repeat(img[..., None], 3, axis=2).copy()
    rgb[find_boundaries(labels, mode="inner")] = (255, 60, 40)
    wells = res.wells(["cells_per_field_mean"]).sort_values(["plate", "well"])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=80, gridspec_kw={"width_ratios": [1.35, 1]})
    ax0.imshow(rgb)
    ax0.set_title(f"{a.field}: {int(f['n_cells'])} cells", fontsize=9)
    ax0.axis("off")
    names = [f"{p} {w}" for p, w in zip(wells["plate"], wells["well"])]
    ax1.barh(names, wells["cells_per_field_mean"], color="#4a7fb5")
    ax1.invert_yaxis()
    ax1.set_xlabel("cells per field (livecell-ray query out wells)", fontsize=8)
    ax1.tick_params(labelsize=7)
    ax1.set_title("the example plate, per well", fontsize=9)
    fig.tight_layout()
    Path(a.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png, bbox_inches="tight")
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
