"""The routing pass of ``--route auto``: every field to do is classified first (a shard task reads it, a model
replica gives its log-probabilities), then each well's type is decided from all its fields at once
(:func:`livecell_ray.model.route.decide`) and every field row carries its route to the shard that segments it.

A well routed by an earlier run keeps that run's decision (``well_cell_type`` and ``route_reason`` in its
fields rows), so a time-lapse well imaged again, or a run resumed, is never split between two models; a plate
map's ``cell_line`` still wins.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from livecell_ray import store
from livecell_ray.config import SegmentConfig
from livecell_ray.model import models, route
from livecell_ray.pipeline.cluster import SHARD_CPUS, format_error

log = logging.getLogger(__name__)


def classify_shard(rows: list[dict[str, Any]], replica: Any, cfg: SegmentConfig) -> list[dict[str, Any]]:
    """A shard's fields read (a file too large to read whole: the window its type is predicted from) and
    classified by ``replica``: each field's log-probabilities, or None with the reason."""
    import ray

    from livecell_ray.pipeline.shard import read_field, stream_window

    fields = [read_field(r, cfg.storage_options, cfg.max_pixels, cfg.normalize, cfg.channel, cfg.pixel_size,
                         cfg.stream_bytes) for r in rows]
    for f in fields:
        if f.get("stream"):
            try:
                f["image"], f["pixel_size"] = stream_window(f, cfg)
            except Exception as exc:  # noqa: BLE001 - the field is routed by its well; its own run says why
                f["status"], f["error"] = "failed", f"{f['path']}: {exc}"
    ok = [f for f in fields if f["status"] == "ok"]
    got: dict[str, Any] = {"classes": [], "abstain_below": 0.0, "logp": [], "error": []}
    if ok:
        got = ray.get(replica.classify.remote([f["image"] for f in ok], [float(f["pixel_size"]) for f in ok],
                                              [str(f["path"]) for f in ok]))
    by_id = {f["field_id"]: (lp, e) for f, lp, e in zip(ok, got["logp"], got["error"])}
    return [{"field_id": f["field_id"], "logp": by_id.get(f["field_id"], (None, ""))[0],
             "error": by_id.get(f["field_id"], (None, f.get("error", "")))[1] or f.get("error", ""),
             "classes": got["classes"], "abstain_below": got["abstain_below"]} for f in fields]


def earlier_routes(outputs: store.Outputs, wells: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The route each of ``wells`` was given by an earlier run, where one was (its latest committed row)."""
    fields = outputs.read_table("fields")
    if fields.empty or "route_reason" not in fields:
        return {}
    fields = fields[fields["route_reason"].isin([route.CONSENSUS, route.ABSTAINED, route.PLATE_MAP])]
    out = {}
    for r in fields.sort_values("timepoint_h" if "timepoint_h" in fields else "timepoint").itertuples():
        w = (str(r.plate), str(r.well))
        if w in wells:
            out[w] = {"well_cell_type": str(r.well_cell_type), "well_cell_type_p": float(r.well_cell_type_p),
                      "route_reason": str(r.route_reason), "routed_to": str(r.routed_to)}
    return out


def route_rows(rows: list[dict[str, Any]], replicas: list[Any], cfg: SegmentConfig, out: str,
               weights: dict[str, models.Weights]) -> list[dict[str, Any]]:
    """``rows`` with each field's route (``routed_key``, the model key it goes to) and what decided it."""
    import ray

    todo = [r for r in rows if "routed_key" not in r]  # a restarted execution: routed already
    if not todo:
        return rows
    outputs = store.Outputs(out, cfg.storage_options)
    wells = {(str(r["plate"]), str(r["well"])) for r in todo}
    given = {(str(p), str(w)): str(line) for p, w, line in cfg.cell_lines}  # plate "": every plate's well
    lines = {(p, w): given.get((p, w)) or given[("", w)] for p, w in wells
             if given.get((p, w)) or given.get(("", w))}
    earlier = earlier_routes(outputs, wells - set(lines))
    to_classify = [r for r in todo if (str(r["plate"]), str(r["well"])) not in lines | earlier]
    task = ray.remote(num_cpus=SHARD_CPUS, max_retries=2)(classify_shard)
    refs = [task.remote(to_classify[i:i + cfg.batch_size], replicas[k % len(replicas)], cfg)
            for k, i in enumerate(range(0, len(to_classify), cfg.batch_size))]
    results: dict[str, dict[str, Any]] = {}
    for ref in refs:
        try:
            for res in ray.get(ref):
                results[res["field_id"]] = res
        except Exception as exc:  # noqa: BLE001 - those fields are routed by the rest of their well
            log.warning("routing pass: a shard could not be classified (%s)", format_error(exc))
    known = next((r for r in results.values() if r["classes"]), None)
    classes = known["classes"] if known else []
    threshold = float(known["abstain_below"]) if known else 0.0
    logp = np.full((len(todo), max(1, len(classes))), np.nan)
    for i, r in enumerate(todo):
        lp = (results.get(r["field_id"]) or {}).get("logp")
        if lp is not None:
            logp[i] = lp
    decided = route.decide([(str(r["plate"]), str(r["well"])) for r in todo], logp, classes or [""],
                           [k for k in weights if k != models.DEFAULT_KEY], threshold, lines)
    names = {k: w.name for k, w in weights.items()}
    for r, d in zip(todo, decided):
        w = (str(r["plate"]), str(r["well"]))
        r.update(cell_type_predicted=d.cell_type_predicted, cell_type_probability=d.cell_type_probability,
                 well_cell_type=d.well_cell_type, well_cell_type_p=d.well_cell_type_probability,
                 route_reason=d.route_reason, routed_key=d.routed_to)
        if w in earlier and w not in lines:
            e = earlier[w]
            key = next((k for k, n in names.items() if n == e["routed_to"]), models.DEFAULT_KEY)
            r.update(well_cell_type=e["well_cell_type"], well_cell_type_p=e["well_cell_type_p"],
                     route_reason=e["route_reason"], routed_key=key)
    return rows
