"""README's picture: the shipped model's cells on one bundled field beside the example plate's map of cells per well.

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
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=80, gridspec_kw={"width_ratios": [1.1, 1]})
    ax0.imshow(rgb)
    ax0.set_title(f"{a.field}: {int(f['n_cells'])} cells", fontsize=9)
    ax0.axis("off")
    # The example's wells lie on distinct positions of one 96-well layout: drawn as the plate map they make.
    grid = np.full((8, 12), np.nan)
    for w, v in zip(wells["well"], wells["cells_per_field_mean"]):
        grid[ord(w[0]) - ord("A"), int(w[1:]) - 1] = v
    im = ax1.imshow(grid, cmap="viridis")
    for (r, c), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax1.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
    ax1.set_xticks(range(12), [str(c + 1) for c in range(12)], fontsize=7)
    ax1.set_yticks(range(8), list("ABCDEFGH"), fontsize=7)
    fig.colorbar(im, ax=ax1, shrink=0.8).ax.tick_params(labelsize=7)
    ax1.set_title("cells per field, per well (livecell-ray query out wells)", fontsize=9)
    fig.tight_layout()
    Path(a.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png, bbox_inches="tight")
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
