"""Dose-response curves per compound: a four-parameter logistic fit of any per-well metric against dose.

    y = bottom + (top - bottom) / (1 + (dose / ic50) ** hill)

fitted by scipy's least squares in log10(dose) (so IC50's confidence interval, from the fit's
covariance and Student's t, is symmetric in log dose, as doses are spaced). Where the plate map
marks controls, each plate's values are normalised to them first: 100% = the mean of its negative
controls, 0% = the mean of its positive controls (or 0 when there are none). A compound gets numbers
only when its wells support a fit; otherwise ``reason`` says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from livecell_ray.plate.platemap import control_kind

COLUMNS = ["compound", "metric", "unit", "n_wells", "n_doses", "ic50", "ic50_low", "ic50_high", "hill", "top",
           "bottom", "r2", "normalised", "reason"]


@dataclass(frozen=True)
class DoseConfig:
    min_doses: int = 4  # distinct positive doses; a 4-parameter fit needs more points than parameters
    confidence: float = 0.95


def logistic4(dose: np.ndarray, bottom: float, top: float, ic50: float, hill: float) -> np.ndarray:
    """The four-parameter logistic (decreasing for hill > 0)."""
    return bottom + (top - bottom) / (1.0 + (np.asarray(dose, float) / ic50) ** hill)


def _model(logd: np.ndarray, bottom: float, top: float, log_ic50: float, hill: float) -> np.ndarray:
    with np.errstate(over="ignore"):  # a steep curve far from its middle: 10**x overflows to inf, y to bottom
        return bottom + (top - bottom) / (1.0 + np.power(10.0, hill * (logd - log_ic50)))


def _pow10(x: float) -> float:
    """10**x as a float, inf (or 0) beyond the float range rather than OverflowError: an interval that wide
    says the data do not bound the IC50."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.power(10.0, x))


def fit(dose: np.ndarray, y: np.ndarray, cfg: DoseConfig | None = None) -> dict[str, object]:
    """IC50 (with its confidence interval), Hill slope, top and bottom; or a reason."""
    from scipy import optimize, stats

    cfg = cfg or DoseConfig()
    dose, y = np.asarray(dose, float), np.asarray(y, float)
    ok = np.isfinite(dose) & np.isfinite(y) & (dose > 0)
    dose, y = dose[ok], y[ok]
    out: dict[str, object] = {k: np.nan for k in ("ic50", "ic50_low", "ic50_high", "hill", "top", "bottom", "r2")}
    out.update(n_wells=len(dose), n_doses=len(np.unique(dose)), reason=None)
    if out["n_doses"] < cfg.min_doses:
        out["reason"] = f"{out['n_doses']} distinct positive doses; a 4-parameter fit needs {cfg.min_doses}"
        return out
    logd = np.log10(dose)
    order = np.argsort(logd)
    lo, hi = float(np.median(y[order][:max(1, len(y) // 4)])), float(np.median(y[order][-max(1, len(y) // 4):]))
    p0 = [hi, lo, float(np.median(logd)), 1.0]
    span = logd.max() - logd.min()
    bounds = ([-np.inf, -np.inf, logd.min() - 2 * span - 1, -20.0], [np.inf, np.inf, logd.max() + 2 * span + 1, 20.0])
    try:
        with warnings.catch_warnings():  # an undetermined covariance shows as an infinite interval instead
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            p, cov = optimize.curve_fit(_model, logd, y, p0=p0, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        out["reason"] = f"the fit did not converge ({exc})"
        return out
    bottom, top, log_ic50, hill = (float(v) for v in p)
    resid = y - _model(logd, *p)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss if ss > 0 else 0.0
    dof = max(1, len(y) - 4)
    se = float(np.sqrt(cov[2, 2])) if np.all(np.isfinite(cov)) else np.inf
    t = float(stats.t.ppf(0.5 + cfg.confidence / 2, dof))
    out.update(ic50=_pow10(log_ic50), ic50_low=_pow10(log_ic50 - t * se), ic50_high=_pow10(log_ic50 + t * se),
               hill=hill, top=top, bottom=bottom, r2=r2)
    if not logd.min() - 1 <= log_ic50 <= logd.max() + 1:
        out["reason"] = "IC50 lies more than 10x outside the doses tested: the curve's middle was not reached"
    elif r2 < 0.5:
        out["reason"] = f"poor fit: the curve explains little of the variation (R² {r2:.2f}); treat IC50 as unknown"
    return out


def normalise(wells: pd.DataFrame, metric: str) -> tuple[pd.Series, bool]:
    """Per plate, the metric as % of the negative controls (0% = positive controls' mean, else 0)."""
    if "control" not in wells.columns:
        return wells[metric].astype(float), False
    kinds = wells["control"].map(control_kind)
    values = wells[metric].astype(float).copy()
    normalised = False
    for _, idx in wells.groupby("plate").groups.items():
        neg = values.loc[idx][kinds.loc[idx] == "negative"].mean()
        pos = values.loc[idx][kinds.loc[idx] == "positive"].mean()
        base = pos if np.isfinite(pos) else 0.0
        if np.isfinite(neg) and neg != base:
            values.loc[idx] = 100.0 * (values.loc[idx] - base) / (neg - base)
            normalised = True
    return values, normalised


def dose_response_table(wells: pd.DataFrame, metric: str, cfg: DoseConfig | None = None) -> pd.DataFrame:
    """One row per compound: the fit of ``metric`` (a column of ``wells``, which carries the plate map)."""
    if "compound" not in wells.columns or "dose" not in wells.columns:
        raise ValueError("dose-response needs a plate map with 'compound' and 'dose' columns")
    if metric not in wells.columns:
        raise ValueError(f"no per-well metric {metric!r} (have: {', '.join(wells.columns)})")
    values, normalised = normalise(wells, metric)
    treated = wells["compound"].notna()
    if "control" in wells.columns:
        treated &= wells["control"].map(control_kind).isna()
    rows = []
    for compound, g in wells[treated].groupby("compound", sort=True):
        unit = g["unit"].dropna().iloc[0] if "unit" in g.columns and g["unit"].notna().any() else ""
        rows.append({"compound": compound, "metric": metric, "unit": unit, "normalised": normalised,
                     **fit(g["dose"].to_numpy(), values.loc[g.index].to_numpy(), cfg)})
    return pd.DataFrame(rows, columns=COLUMNS)
