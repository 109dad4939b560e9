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
from livecell_ray.answers.query import Results  # noqa: E402
from livecell_ray.plate.manifest import plate_grid, row_index, row_name  # noqa: E402

HEATMAP_METRICS = ("cells_per_field_mean", "confluence", "area_median", "eccentricity_mean")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def heatmap(wells: pd.DataFrame, metric: str, plate: str) -> str:
    """One plate grid coloured by a metric; wells without data are left empty (grey hatch)."""
    w = wells[wells["plate"] == plate]
    rows_cols = [store_well(x) for x in w["well"]]
    nr, nc = plate_grid([r for r, _ in rows_cols], [c for _, c in rows_cols])
    grid = np.full((nr, nc), np.nan)
    for (r, c), v in zip(rows_cols, w[metric]):
        grid[row_index(r), c - 1] = v
    fig, ax = plt.subplots(figsize=(max(4, nc * 0.42), max(2.6, nr * 0.36)))
    ax.set_facecolor("#e8e8e8")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="equal")
    ax.set_xticks(range(nc), [str(i + 1) for i in range(nc)], fontsize=7)
    ax.set_yticks(range(nr), [row_name(i) for i in range(nr)], fontsize=7)
    ax.set_xticks(np.arange(-0.5, nc), minor=True)
    ax.set_yticks(np.arange(-0.5, nr), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_title(f"{plate}: {metric}", fontsize=9)
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
            g = g.sort_values("timepoint")
            axes[0, j].plot(g["timepoint"], g["cells_per_field_mean"], marker="o", ms=3, label=f"{plate} {well}")
            axes[1, j].plot(g["timepoint"], g["confluence"], marker="o", ms=3)
        axes[0, j].set_title(ct or "(no cell type)", fontsize=9)
        axes[0, j].set_ylabel("cells per field")
        axes[1, j].set_ylabel("confluence")
        axes[1, j].set_xlabel("time (h)")
        if sub[["plate", "well"]].drop_duplicates().shape[0] <= 12:
            axes[0, j].legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


def area_distributions(cells: pd.DataFrame) -> str:
    """Cell area histograms per cell type (log scale)."""
    cts = sorted(cells["cell_type"].fillna("").unique()) or [""]
    fig, ax = plt.subplots(figsize=(7, 4))
    for ct in cts:
        a = cells.loc[cells["cell_type"].fillna("") == ct, "area_px"]
        if len(a):
            ax.hist(a, bins=np.logspace(np.log10(max(1, a.min())), np.log10(a.max() + 1), 40), histtype="step",
                    label=f"{ct or '(none)'} (n={len(a)})")
    ax.set_xscale("log")
    ax.set_xlabel("cell area (px)")
    ax.set_ylabel("cells")
    ax.legend(fontsize=7)
    return _png(fig)


def overlay(image: np.ndarray, labels: np.ndarray, title: str) -> str:
    """The image with each cell's outline."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(image[..., None], 3, axis=2).copy()
    rgb[find_boundaries(labels, mode="inner")] = (255, 60, 60)
    fig, ax = plt.subplots(figsize=(5, 5 * image.shape[0] / image.shape[1]))
    ax.imshow(rgb)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return _png(fig)


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
    """Mean confluence over time, one line per treatment (mean over its wells)."""
    df = per_time.assign(treatment=treatment_labels(per_time))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in df.groupby("treatment"):
        m = g.groupby("timepoint")["confluence"].mean()
        ax.plot(m.index, m.values, marker="o", ms=3, label=name)
    ax.set_xlabel("time (h)")
    ax.set_ylabel("confluence")
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

    parts = ["<h2>Growth (exponential phase per well)</h2>"]
    growth = res.growth()
    parts.append(growth.to_html(index=False, classes="growth-table", float_format=lambda v: f"{v:.4g}"))
    if res.platemap is None:
        return parts
    wells = res.wells(["fields", "cells_per_field_mean", "confluence"])
    wells = wells.assign(treatment=treatment_labels(wells))
    by_t = wells.groupby("treatment").agg(wells=("well", "count"), cells_per_field_mean=("cells_per_field_mean",
                                          "mean"), confluence=("confluence", "mean")).reset_index()
    parts.append("<h2>Wells by treatment</h2>" + by_t.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
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
        parts.append(fits.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
    issues = res.platemap_issues()
    if len(issues):
        parts.append("<h2>Plate map vs imaged wells</h2>" + issues.to_html(index=False))
    return parts


def build(out: str, storage_options: dict[str, Any] | None = None, max_overlays: int = 96) -> str:
    """The HTML text of the report for one run's OUT."""
    res = Results(out, storage_options)
    outputs = res.outputs
    fields = res.df("SELECT * FROM fields")
    cells = res.df("SELECT plate, well, cell_type, area_px FROM cells")
    wells = res.wells(list(HEATMAP_METRICS) + ["cells", "fields", "failed"])
    per_time = res.wells(["cells_per_field_mean", "confluence"], by_timepoint=True)
    failures = res.df("SELECT * FROM failures")
    run = outputs.read_run_or_empty()
    parts = [f"<h1>livecell-ray plate report</h1><p>{html.escape(outputs.url)} &middot; generated "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} &middot; {len(fields)} fields, {len(cells)} cells, "
             f"{len(failures)} failures</p>"]
    if run:
        models = run.get("provenance", {}).get("models", {})
        parts.append("<p>model: " + ", ".join(f"{html.escape(k)} = sha256 {v['sha256'][:12]}" for k, v in
                                               models.items()) + "</p>")
    parts.append("<h2>Plate heatmaps</h2>")
    for plate in sorted(wells["plate"].unique()):
        for metric in HEATMAP_METRICS:
            parts.append(f'<img class="heatmap" alt="{html.escape(plate)} {metric}" '
                         f'src="data:image/png;base64,{heatmap(wells, metric, plate)}">')
    parts.append("<h2>Growth curves</h2>")
    if len(per_time):
        parts.append(f'<img class="growth" alt="growth curves" src="data:image/png;base64,'
                     f'{growth_curves(per_time, fields)}">')
    parts += _screen_sections(res, per_time)
    parts.append("<h2>Cell area by cell type</h2>")
    if len(cells):
        parts.append(f'<img class="areas" alt="area distributions" src="data:image/png;base64,'
                     f'{area_distributions(cells)}">')
    parts.append("<h2>Overlays (one field per well)</h2><div>")
    firsts = fields.sort_values(["plate", "well", "timepoint", "site"]).groupby(["plate", "well"]).head(1)
    for f in firsts.head(max_overlays).itertuples():
        zpath = f.zarr_path.split(".zarr/", 1)[1]
        img = store.read_image(outputs, f.plate, zpath, f.t_index)
        lab = store.read_labels(outputs, f.plate, zpath, f.t_index)
        title = f"{f.plate} {f.well} site {f.site} t={f.timepoint:g} h: {f.n_cells} cells"
        parts.append(f'<img class="overlay" alt="{html.escape(title)}" '
                     f'src="data:image/png;base64,{overlay(img, lab, title)}">')
    parts.append("</div><h2>Wells</h2>" + wells.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(failures):
        parts.append("<h2>Failures</h2>" + failures[["path", "stage", "error"]].to_html(index=False))
    style = ("body{font-family:sans-serif;margin:2em;} img{margin:4px;border:1px solid #ddd;} "
             "img.overlay{width:360px;} table{border-collapse:collapse;font-size:12px;} "
             "td,th{border:1px solid #ccc;padding:2px 6px;}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>livecell-ray report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write(out: str, html_path: str, storage_options: dict[str, Any] | None = None) -> str:
    """Build and save the report; returns its path."""
    text = build(out, storage_options)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(text)
    return html_path
