"""docs/dose_response.png: the report's dose-response plot and fit for a simulated compound of known IC50.

    python examples/dose_response_figure.py [--png docs/dose_response.png]

Three replicate wells at eight doses of a compound with IC50 1 uM and Hill slope 1, 5% noise, plus
vehicle and positive controls, go through the same normalisation, fit and plot as `livecell-ray
report` uses, so the figure shows what the method recovers.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import numpy as np
import pandas as pd

from livecell_ray.answers import dose_response, report

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", default=str(HERE.parent / "docs" / "dose_response.png"))
    a = ap.parse_args()
    rng = np.random.default_rng(7)
    doses = np.repeat(np.logspace(-2, 1.5, 8), 3)
    cells = 20 + 180 * dose_response.logistic4(doses, 0.0, 1.0, 1.0, 1.0) * np.exp(rng.normal(0, 0.05, len(doses)))
    wells = pd.DataFrame({"plate": "P", "well": [f"W{i}" for i in range(len(doses))], "compound": "drugX",
                          "dose": doses, "unit": "uM", "control": None, "cells_per_field_mean": cells})
    controls = pd.DataFrame({"plate": "P", "well": ["C1", "C2", "C3", "K1", "K2", "K3"], "compound": None,
                             "dose": np.nan, "unit": None, "control": ["vehicle"] * 3 + ["positive"] * 3,
                             "cells_per_field_mean": [200.0, 196.0, 204.0, 20.0, 21.0, 19.0]})
    allw = pd.concat([wells, controls], ignore_index=True)
    fit = dose_response.dose_response_table(allw, "cells_per_field_mean").iloc[0].to_dict()
    values, _ = dose_response.normalise(allw, "cells_per_field_mean")
    png = report.dose_curve(wells, values[: len(wells)], fit, "cells_per_field_mean")
    Path(a.png).write_bytes(base64.b64decode(png))
    print(f"IC50 {fit['ic50']:.3g} uM [{fit['ic50_low']:.3g}, {fit['ic50_high']:.3g}], Hill {fit['hill']:.2f} "
          f"(true 1 uM, 1.0) -> {a.png}")


if __name__ == "__main__":
    main()
