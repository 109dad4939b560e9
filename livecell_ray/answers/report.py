"""A self-contained HTML plate report: heatmaps, growth curves, area distributions, overlays.

Everything is drawn with matplotlib and embedded as base64 PNG, so the page is one file that can be
mailed or archived beside the plate.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from livecell_ray import store  # noqa: E402
from livecell_ray.answers.query import Results, last_timepoint  # noqa: E402
from livecell_ray.plate.manifest import plate_grid, row_index, row_name  # noqa: E402

HEATMAP_METRICS = ("cells_per_field_mean", "confluence_pct", "area_um2_median", "eccentricity_mean")
#: Each column as a biologist reads it, with its unit.
LABELS = {"cells_per_field_mean": "cells per field", "confluence_pct": "confluence (%)",
          "area_um2_median": "median cell area (µm²)", "area_px_median": "median cell area (px)",
          "eccentricity_mean": "mean eccentricity (0 round, 1 elongated)", "cells": "cells", "fields": "fields",
          "images": "images", "failed": "failed images", "timepoint_h": "time since first scan (h)"}
#: Small multiples (one heatmap a timepoint) for plates with at most this many timepoints.
SMALL_MULTIPLES = 6


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def label(column: str) -> str:
    return LABELS.get(column, column.replace("_", " "))


def _fmt(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def heatmap(wells: pd.DataFrame, metric: str, plate: str, when: str = "") -> str:
    """One plate grid coloured by a metric, each well's value printed in it; wells without data are left empty
    (grey). ``when``: which timepoint the values are, for the title."""
    w = wells[wells["plate"] == plate]
    rows_cols = [store_well(x) for x in w["well"]]
    nr, nc = plate_grid([r for r, _ in rows_cols], [c for _, c in rows_cols])
    grid = np.full((nr, nc), np.nan)
    for (r, c), v in zip(rows_cols, w[metric]):
        grid[row_index(r), c - 1] = np.nan if v is None or pd.isna(v) else v
    fig, ax = plt.subplots(figsize=(max(4, nc * 0.55), max(2.6, nr * 0.45)))
    ax.set_facecolor("#e8e8e8")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="equal")
    if nr * nc <= 384:  # a 1536-well plate's values would not be legible
        lo, hi = (np.nanmin(grid), np.nanmax(grid)) if np.isfinite(grid).any() else (0, 1)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                light = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis is light at its top
                ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=6 if nc <= 12 else 4,
                        color="black" if light else "white")
    ax.set_xticks(range(nc), [str(i + 1) for i in range(nc)], fontsize=7)
    ax.set_yticks(range(nr), [row_name(i) for i in range(nr)], fontsize=7)
    ax.set_xticks(np.arange(-0.5, nc), minor=True)
    ax.set_yticks(np.arange(-0.5, nr), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_title(f"{plate}: {label(metric)}" + (f", {when}" if when else ""), fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def store_well(well: str) -> tuple[str, int]:
    from livecell_ray.plate.manifest import parse_well

    return parse_well(well)


def growth_curves(per_time: pd.DataFrame, fields: pd.DataFrame) -> str:
    """Cell count and confluence over time per well, one panel pair per cell type."""
    types = fields.groupby(["plate", "well"])["cell_type"].first().reset_index()
    d = per_time.merge(types, on=["plate", "well"], how="left")
    cts = sorted(d["cell_type"].fillna("").unique())
    fig, axes = plt.subplots(2, len(cts), figsize=(4.2 * len(cts), 6), squeeze=False)
    for j, ct in enumerate(cts):
        sub = d[d["cell_type"].fillna("") == ct]
        for (plate, well), g in sub.groupby(["plate", "well"]):
            g = g.sort_values("timepoint_h")
            axes[0, j].plot(g["timepoint_h"], g["cells_per_field_mean"], marker="o", ms=3, label=f"{plate} {well}")
            axes[1, j].plot(g["timepoint_h"], g["confluence_pct"], marker="o", ms=3)
        axes[0, j].set_title(ct or "(no cell type)", fontsize=9)
        axes[0, j].set_ylabel(label("cells_per_field_mean"))
        axes[1, j].set_ylabel(label("confluence_pct"))
        axes[1, j].set_xlabel(label("timepoint_h"))
        if sub[["plate", "well"]].drop_duplicates().shape[0] <= 12:
            axes[0, j].legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


def area_distributions(cells: pd.DataFrame) -> str:
    """Cell area histograms per cell type (log scale), in µm² where every field's scale is known."""
    um2 = "area_um2" in cells and len(cells) and cells["area_um2"].notna().all()
    col = "area_um2" if um2 else "area_px"
    cts = sorted(cells["cell_type"].fillna("").unique()) or [""]
    fig, ax = plt.subplots(figsize=(7, 4))
    for ct in cts:
        a = cells.loc[cells["cell_type"].fillna("") == ct, col]
        a = a[a > 0]
        if len(a):
            ax.hist(a, bins=np.logspace(np.log10(a.min()), np.log10(a.max() * 1.01), 40), histtype="step",
                    label=f"{ct or '(none)'} (n={len(a)})")
    ax.set_xscale("log")
    ax.set_xlabel("cell area (µm²)" if um2 else "cell area (px; the pixel size is unknown)")
    ax.set_ylabel("cells")
    ax.legend(fontsize=7)
    return _png(fig)


def overlay(image: np.ndarray, labels: np.ndarray) -> str:
    """The image (any dtype, scaled for display) with each cell's outline, at full resolution, as PNG."""
    from skimage.segmentation import find_boundaries

    from livecell_ray.plate.normalize import normalize

    grey = normalize(image) if image.dtype != np.uint8 else image
    rgb = np.repeat(grey[..., None], 3, axis=2).copy()
    rgb[find_boundaries(labels, mode="inner")] = (255, 60, 60)
    buf = io.BytesIO()
    plt.imsave(buf, rgb, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def treatment_labels(wells: pd.DataFrame) -> pd.Series:
    """Each well's treatment as a label: the map's ``treatment`` column, else compound and dose, else control."""
    from livecell_ray.plate.platemap import control_kind

    def label(r: Any) -> str:
        if "treatment" in r and isinstance(r["treatment"], str):
            return r["treatment"]
        if "control" in r and control_kind(r["control"]):
            return f"{control_kind(r['control'])} control"
        if "compound" in r and isinstance(r["compound"], str):
            dose = f" {r['dose']:g}" if "dose" in r and pd.notna(r["dose"]) else ""
            unit = f" {r['unit']}" if "unit" in r and isinstance(r["unit"], str) else ""
            return f"{r['compound']}{dose}{unit}"
        return "(not in the plate map)"

    return wells.apply(label, axis=1) if len(wells) else pd.Series([], dtype=str)


def confluence_by_treatment(per_time: pd.DataFrame) -> str:
    """Confluence over time per treatment: the mean and standard deviation across its replicate wells, at each
    timepoint where every one of its wells was imaged (a mean over a changing set of wells would move when one
    well stops being imaged, not when the cells change)."""
    df = per_time.assign(treatment=treatment_labels(per_time))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in df.groupby("treatment"):
        n = g[["plate", "well"]].drop_duplicates().shape[0]
        at = g.groupby("timepoint_h")["confluence_pct"].agg(["mean", "std", "count"])
        at = at[at["count"] == n]
        if at.empty:
            continue
        ax.errorbar(at.index, at["mean"], yerr=at["std"].fillna(0) if n > 1 else None, marker="o", ms=3,
                    capsize=2, label=f"{name} ({n} well{'s' if n > 1 else ''})")
    ax.set_xlabel(label("timepoint_h"))
    ax.set_ylabel(label("confluence_pct") + ", mean ± sd of wells")
    if df["treatment"].nunique() <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def dose_curve(wells: pd.DataFrame, values: pd.Series, fit: dict[str, Any], metric: str) -> str:
    """One compound's wells against dose (log axis) with its four-parameter logistic fit."""
    from livecell_ray.answers.dose_response import logistic4

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.scatter(wells["dose"], values, s=14, color="#4a7fb5")
    if pd.notna(fit["ic50"]):
        d = np.logspace(np.log10(wells["dose"].min()), np.log10(wells["dose"].max()), 200)
        ax.plot(d, logistic4(d, fit["bottom"], fit["top"], fit["ic50"], fit["hill"]), color="#c0392b")
        ax.axvline(fit["ic50"], color="#c0392b", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"dose ({fit['unit']})" if fit["unit"] else "dose")
    ax.set_ylabel(f"{metric} ({'% of controls' if fit['normalised'] else 'raw'})", fontsize=8)
    ic50 = (f"IC50 {fit['ic50']:.3g} [{fit['ic50_low']:.3g}, {fit['ic50_high']:.3g}], Hill {fit['hill']:.2f}"
            if pd.notna(fit["ic50"]) else fit["reason"])
    ax.set_title(f"{fit['compound']}: {ic50}", fontsize=8)
    return _png(fig)


def _screen_sections(res: Results, per_time: pd.DataFrame) -> list[str]:
    """Growth table, and with a plate map: treatments, confluence by treatment, dose-response, mismatches."""
    from livecell_ray.answers import dose_response
    from livecell_ray.plate.platemap import control_kind

    parts = ["<h2>Growth (exponential phase per well; times in hours since the plate's first scan)</h2>"]
    growth = res.growth()
    parts.append(_table(growth, "growth-table"))
    if res.platemap is None:
        return parts
    wells = res.wells(["fields", "cells_per_field_mean", "confluence_pct"], last=True)
    wells = wells.assign(treatment=treatment_labels(wells))
    by_t = wells.groupby("treatment").agg(
        wells=("well", "count"), cells_per_field_mean=("cells_per_field_mean", "mean"),
        cells_per_field_sd_of_wells=("cells_per_field_mean", "std"), confluence_pct=("confluence_pct", "mean"),
        confluence_pct_sd_of_wells=("confluence_pct", "std")).reset_index()
    parts.append("<h2>Wells by treatment (each well's last timepoint; mean and sd across its wells)</h2>"
                 + _table(by_t))
    if len(per_time):
        parts.append(f'<img class="treatment" alt="confluence by treatment" src="data:image/png;base64,'
                     f'{confluence_by_treatment(res.with_platemap(per_time))}">')
    if {"compound", "dose"} <= set(res.platemap.columns):
        metric = "cells_per_field_mean"
        per_well = res.per_well(metric)
        values, _ = dose_response.normalise(per_well, metric)
        fits = dose_response.dose_response_table(per_well, metric)  # the same wells, not queried again
        parts.append(f"<h2>Dose-response ({metric} at each well's last timepoint)</h2>")
        for f in fits.to_dict("records"):
            sel = (per_well["compound"] == f["compound"]) & (per_well["dose"] > 0)
            if "control" in per_well.columns:
                sel &= per_well["control"].map(control_kind).isna()
            parts.append(f'<img class="dose" alt="{html.escape(str(f["compound"]))}" src="data:image/png;base64,'
                         f'{dose_curve(per_well[sel], values[sel], f, metric)}">')
        parts.append(_table(fits))
    issues = res.platemap_issues()
    if len(issues):
        parts.append("<h2>Plate map vs imaged wells</h2>" + _table(issues))
    return parts


def _table(df: pd.DataFrame, classes: str | None = None) -> str:
    """An HTML table whose empty values are blank, not NaN."""
    return df.to_html(index=False, classes=classes, na_rep="", float_format=lambda v: f"{v:.4g}")


def _heatmaps(res: Results, per_time: pd.DataFrame) -> list[str]:
    """Per plate: each metric at each well's last timepoint (the time said in the title), then, for plates
    of few timepoints, cells per field at every timepoint."""
    parts = []
    um2 = per_time["area_um2_median"].notna().any()
    metrics = [m if m != "area_um2_median" or um2 else "area_px_median" for m in HEATMAP_METRICS]
    last = last_timepoint(per_time)
    for plate in sorted(per_time["plate"].unique()):
        at = last.loc[last["plate"] == plate, "timepoint_h"]
        when = (f"at {at.iloc[0]:g} h" if at.nunique() == 1 else
                f"at each well's last timepoint ({at.min():g} to {at.max():g} h)")
        for metric in metrics:
            parts.append(f'<img class="heatmap" alt="{html.escape(plate)}: {label(metric)}, {when}" '
                         f'src="data:image/png;base64,{heatmap(last, metric, plate, when)}">')
        times = sorted(per_time.loc[per_time["plate"] == plate, "timepoint_h"].unique())
        if 1 < len(times) <= SMALL_MULTIPLES:
            parts.append("<div>")
            for t in times:
                at_t = per_time[(per_time["plate"] == plate) & (per_time["timepoint_h"] == t)]
                parts.append(f'<img class="heatmap small" alt="{html.escape(plate)} at {t:g} h" src="data:image/png;'
                             f'base64,{heatmap(at_t, "cells_per_field_mean", plate, f"at {t:g} h")}">')
            parts.append("</div>")
    return parts


def build(out: str, storage_options: dict[str, Any] | None = None, max_overlays: int = 96,
          res: Results | None = None) -> str:
    """The HTML text of the report for one run's OUT (``res``: its results as opened already, with the plate
    map they use)."""
    res = res or Results(out, storage_options)
    outputs = res.outputs
    fields = res.df("SELECT * FROM fields")
    cells = res.df("SELECT plate, well, cell_type, area_px, area_um2 FROM cells")
    per_time = res.wells(list(HEATMAP_METRICS) + ["area_px_median", "cells", "fields", "failed"])
    failures = res.df("SELECT * FROM failures")
    run = outputs.read_run_or_empty()
    parts = [f"<h1>livecell-ray plate report</h1><p>{html.escape(outputs.url)} &middot; generated "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} &middot; {len(fields)} images, {len(cells)} cells, "
             f"{len(failures)} failures</p>"]
    if run:
        models = run.get("provenance", {}).get("models", {})
        parts.append("<p>model: " + ", ".join(f"{html.escape(k)} = sha256 {v['sha256'][:12]}" for k, v in
                                               models.items()) + "</p>")
    parts.append("<h2>Plate heatmaps</h2>")
    if len(per_time):
        parts += _heatmaps(res, per_time)
    parts.append("<h2>Growth curves</h2>")
    if len(per_time):
        parts.append(f'<img class="growth" alt="growth curves" src="data:image/png;base64,'
                     f'{growth_curves(per_time, fields)}">')
    parts += _screen_sections(res, per_time)
    parts.append("<h2>Cell area by cell type</h2>")
    if len(cells):
        parts.append(f'<img class="areas" alt="area distributions" src="data:image/png;base64,'
                     f'{area_distributions(cells)}">')
    parts.append("<h2>Overlays (one field per well, at its first and last timepoint; click for full size)</h2><div>")
    order = fields.sort_values(["plate", "well", "site", "timepoint_h"])
    firsts = order.groupby(["plate", "well"]).head(1)
    lasts = order[order["site"].isin(firsts["site"])].groupby(["plate", "well"]).tail(1)
    shown = pd.concat([firsts.head(max_overlays), lasts.head(max_overlays)]).drop_duplicates("field_id")
    for f in shown.sort_values(["plate", "well", "timepoint_h"]).itertuples():
        zpath = f.zarr_path.split(".zarr/", 1)[1]
        img = store.read_image(outputs, f.plate, zpath, f.t_index)
        lab = store.read_labels(outputs, f.plate, zpath, f.t_index)
        title = f"{f.plate} {f.well} site {f.site}, {f.timepoint_h:g} h: {f.n_cells} cells"
        parts.append(f'<figure><img class="overlay" alt="{html.escape(title)}" title="click: full size / back" '
                     f'onclick="this.classList.toggle(\'full\')" src="data:image/png;base64,{overlay(img, lab)}">'
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    wells = last_timepoint(per_time)
    parts.append("</div><h2>Wells (each well's last timepoint; every timepoint: livecell-ray query OUT wells)</h2>"
                 + _table(res.with_platemap(wells.sort_values(["plate", "well"]))))
    if len(failures):
        parts.append("<h2>Failures</h2>" + _table(failures[["path", "stage", "error"]]))
    style = ("body{font-family:sans-serif;margin:2em;} img{margin:4px;border:1px solid #ddd;} "
             "figure{display:inline-block;margin:4px;} figcaption{font-size:11px;} "
             "img.overlay{width:480px;cursor:zoom-in;} img.overlay.full{width:auto;max-width:none;cursor:zoom-out;} "
             "img.small{width:260px;} table{border-collapse:collapse;font-size:12px;} "
             "td,th{border:1px solid #ccc;padding:2px 6px;}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>livecell-ray report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write(out: str, html_path: str, storage_options: dict[str, Any] | None = None, res: Results | None = None) -> str:
    """Build and save the report; returns its path."""
    text = build(out, storage_options, res=res)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(text)
    return html_path
