"""Growth rate and doubling time per well, from cell counts over time.

Cells in culture grow exponentially between a lag and a plateau (confluence), so a single
log-linear fit over the whole series underestimates the rate. The exponential phase is found as the
window of consecutive timepoints whose log-count fit has the largest lower confidence bound on its
slope among windows that fit well (R² >= ``min_r2``): a long clean phase beats a short steep run of
noise, and a window that takes in the lag or the plateau loses slope. The bound uses one noise level
for the whole well (from its log counts' second differences, robust to the curve's shape) and a
Bonferroni-corrected 95% quantile over the windows tried, so a flat noisy well shows no growth. A
well gets a number only when that bound is above zero; otherwise ``reason`` says why (too few
timepoints, no growth, no phase that fits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

COLUMNS = ["growth_rate_per_h", "doubling_time_h", "r2", "n_points", "t_start_h", "t_end_h", "n_timepoints",
           "reason"]


@dataclass(frozen=True)
class GrowthConfig:
    """What an exponential phase must look like to be reported."""

    min_points: int = 3  # timepoints in the fitted window
    min_r2: float = 0.9  # of the log-linear fit over the window
    min_rate: float = 1e-4  # per hour: the slope's lower 95% bound must exceed it (doubling under a year)


def _fit(t: np.ndarray, y: np.ndarray, sigma: float) -> tuple[float, float, float]:
    """Slope, its standard error (for noise sigma in y) and R² of a least-squares line."""
    slope, intercept = np.polyfit(t, y, 1)
    resid = y - (slope * t + intercept)
    ss = float(((y - y.mean()) ** 2).sum())
    sxx = float(((t - t.mean()) ** 2).sum())
    se = sigma / float(np.sqrt(sxx)) if sxx > 0 else np.inf
    return float(slope), se, (1.0 - float((resid**2).sum()) / ss) if ss > 0 else 0.0


def noise_level(y: np.ndarray) -> float:
    """Standard deviation of the noise in a smooth series, from the median absolute second difference
    (a second difference of white noise has variance 6 sigma²; smooth growth adds almost nothing)."""
    d2 = np.diff(y, 2)
    return max(1e-3, 1.4826 * float(np.median(np.abs(d2))) / np.sqrt(6.0)) if len(d2) else 1e-3


def fit_well(hours: np.ndarray, counts: np.ndarray, cfg: GrowthConfig | None = None) -> dict[str, object]:
    """Growth rate (ln units per hour), doubling time and the window used, or a reason instead."""
    from scipy import stats

    cfg = cfg or GrowthConfig()
    order = np.argsort(hours)
    t, n = np.asarray(hours, float)[order], np.asarray(counts, float)[order]
    row: dict[str, object] = {c: np.nan for c in COLUMNS}
    row.update(n_points=0, n_timepoints=len(t), reason=None)
    keep = np.isfinite(n) & (n > 0)
    t, n = t[keep], n[keep]
    if len(t) < cfg.min_points:
        row["reason"] = f"too few timepoints with cells ({len(t)}; a fit needs {cfg.min_points})"
        return row
    y = np.log(n)
    sigma = noise_level(y)
    spans = [(i, j) for i in range(len(t)) for j in range(i + cfg.min_points, len(t) + 1)]
    z = float(stats.norm.ppf(1 - 0.025 / len(spans)))
    windows = []  # (lower bound of the slope, slope, R², first, end)
    for i, j in spans:
        slope, se, r2 = _fit(t[i:j], y[i:j], sigma)
        windows.append((slope - z * se, slope, r2, i, j))
    growing = [w for w in windows if w[0] > cfg.min_rate]
    if not growing:
        best = max(w[1] for w in windows)
        row["reason"] = (f"no growth: no window of {cfg.min_points}+ timepoints has a slope significantly above "
                         f"zero (steepest {best:.2g} per h)")
        return row
    good = [w for w in growing if w[2] >= cfg.min_r2]
    if not good:
        row["reason"] = (f"no exponential phase: growing windows fit log-linearly with R² at most "
                         f"{max(w[2] for w in growing):.2f} < {cfg.min_r2}")
        return row
    _, slope, r2, i, j = max(good, key=lambda w: w[0])
    row.update(growth_rate_per_h=slope, doubling_time_h=float(np.log(2) / slope), r2=r2, n_points=j - i,
               t_start_h=float(t[i]), t_end_h=float(t[j - 1]))
    return row


def growth_table(per_time: pd.DataFrame, metric: str = "cells_per_field_mean",
                 cfg: GrowthConfig | None = None) -> pd.DataFrame:
    """One row per plate and well from per-well-and-timepoint rows (``Results.wells(by_timepoint=True)``).

    The mean cells per field is the count that stays comparable when a well's number of imaged fields
    changes between timepoints.
    """
    rows = []
    time = "timepoint_h" if "timepoint_h" in per_time else "timepoint"  # hours since the first scan; 0.2's name
    for (plate, well), g in per_time.groupby(["plate", "well"], sort=True):
        rows.append({"plate": plate, "well": well, **fit_well(g[time].to_numpy(), g[metric].to_numpy(), cfg)})
    out = pd.DataFrame(rows, columns=["plate", "well", *COLUMNS])
    return out.astype({"n_points": int, "n_timepoints": int})
