"""Which field cell-type classifier generalises to wells it never saw? (issue 36)

Every LIVECell field here (annotated, unlabelled, livecell_examples; duplicates by name counted once) and
Sartorius's SH-SY5Y fields, split by well: leave one well out (LIVECell's wells are (type, well), one plate
per type; Sartorius names no wells, so its SH-SY5Y fields go in 4 fixed blocks). Candidates:

- ``embed``: the general segmentation model's own features (``weights/small.pt``, trained on LIVECell's
  cells): spatial mean and standard deviation of backbone and neck layers over the whole field, then a
  multinomial logistic regression;
- ``cells``: distributions of the cells that model finds (size, shape, density, texture quantiles);
- ``both``: the two side by side;
each with balanced weights per well and type, and with and without photometric augmentation (gamma,
contrast, blur, noise) of the training fields. Reported per type with the confusion matrix, field-level and
with well consensus (summed log-probabilities over the held-out well's fields), plus calibration (the
temperature that minimises held-out log-loss) and the accuracy / coverage of abstention thresholds.

    python research/celltype_cv.py features      # cached in runs/celltype_cv/features.npz (~10 CPU min)
    python research/celltype_cv.py cv            # weights/logs/celltype/cv.json
    python research/celltype_cv.py ship          # weights/celltype.json: the kept variant (cells) on every field
    python research/celltype_cv.py route         # weights/logs/celltype/route_cv.json: --route auto's mask AP on
                                                 # the annotated fields, each routed as its held-out well decides
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
RUN = ROOT / "runs" / "celltype_cv"
LOGS = ROOT / "weights" / "logs" / "celltype"
AUGMENTS = 4  # photometric copies of each field
PX = 1.24  # um/px: LIVECell's Incucyte at 10x, and Sartorius's (research/shsy5y_scale.py)


def fields() -> list[dict]:
    """Every usable field once: path, type, group (the well it came from)."""
    from livecell_ray.plate.manifest import parse_name

    seen: dict[str, dict] = {}
    for folder in ("livecell/annotated/images", "livecell/unlabelled", "livecell_examples"):
        for p in sorted((DATA / folder).glob("*.tif")):
            meta = parse_name(p.name)
            if meta and p.name not in seen:
                seen[p.name] = {"path": str(p), "type": meta["cell_type"], "source": "livecell",
                                "group": f"{meta['cell_type']}/{meta['well']}"}
    coco = json.loads((DATA / "sartorius" / "annotations.json").read_text())
    sh = sorted(i["file_name"] for i in coco["images"] if i["cell_type"] == "shsy5y")
    for k, name in enumerate(sh):
        seen[name] = {"path": str(DATA / "sartorius" / "images" / name), "type": "SHSY5Y", "source": "sartorius",
                      "group": f"SHSY5Y/sartorius-{k % 4}"}
    return list(seen.values())


def extract(paths: list[str]) -> dict[str, np.ndarray]:
    from livecell_ray.model import classify as celltype
    from livecell_ray.plate.imaging import normalize, read_image

    feats = celltype.FieldFeatures(str(ROOT / "weights" / "small.pt"))
    rng = np.random.default_rng(0)
    out: dict[str, list] = {"embed": [], "cells": [], "aug_embed": [], "aug_cells": []}
    for n, p in enumerate(paths):
        img = read_image(p)
        e, c = feats.features(normalize(img), PX)
        out["embed"].append(e)
        out["cells"].append(c)
        ae, ac = [], []
        for _ in range(AUGMENTS):
            e2, c2 = feats.features(normalize(celltype.photometric(img, rng)), PX)
            ae.append(e2)
            ac.append(c2)
        out["aug_embed"].append(ae)
        out["aug_cells"].append(ac)
        print(f"{n + 1}/{len(paths)} {Path(p).name}", flush=True)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def cv(which: str, augment: bool, meta: list[dict], f: dict[str, np.ndarray]) -> dict:
    from livecell_ray.training.classifier import fit_head

    types = np.array([m["type"] for m in meta])
    groups = np.array([m["group"] for m in meta])
    keys = ["embed", "cells"] if which == "both" else [which]
    X = np.concatenate([f[k] for k in keys], 1)
    XA = np.concatenate([f["aug_" + k] for k in keys], 2)
    classes = sorted(set(types))
    logp = np.zeros((len(meta), len(classes)))
    for g in sorted(set(groups)):
        tr, te = groups != g, groups == g
        Xtr, ytr, gtr = X[tr], types[tr], groups[tr]
        if augment:
            Xtr = np.concatenate([Xtr, XA[tr].reshape(-1, X.shape[1])])
            ytr = np.concatenate([ytr, np.repeat(types[tr], AUGMENTS)])
            gtr = np.concatenate([gtr, np.repeat(groups[tr], AUGMENTS)])
        head = fit_head(Xtr, ytr, gtr, classes)
        logp[te] = head.log_proba(X[te], temperature=1.0)
    return {"logp": logp, "classes": classes, "types": types, "groups": groups}


def score(r: dict, meta: list[dict]) -> dict:
    classes, types, groups, logp = r["classes"], r["types"], r["groups"], r["logp"]
    lc = np.array([m["source"] == "livecell" for m in meta])
    pred = np.array(classes)[logp.argmax(1)]
    well = {g: classes[int(logp[groups == g].sum(0).argmax())] for g in set(groups)}
    wpred = np.array([well[g] for g in groups])
    # temperature: the one minimising log-loss of the held-out predictions (each fold's own held-out part)
    best_t, best_ll = 1.0, np.inf
    idx = np.array([classes.index(t) for t in types])
    for t in np.geomspace(0.25, 8, 41):
        lp = logp / t
        lp = lp - np.logaddexp.reduce(lp, 1, keepdims=True)
        ll = -lp[np.arange(len(idx)), idx].mean()
        if ll < best_ll:
            best_t, best_ll = float(t), float(ll)
    lp = logp / best_t
    prob = np.exp(lp - np.logaddexp.reduce(lp, 1, keepdims=True)).max(1)
    per_type = {}
    for t in classes:
        m = (types == t) & lc
        if m.any():
            per_type[t] = {"fields": int(m.sum()), "wells": len(set(groups[m])),
                           "field_accuracy": round(float((pred[m] == t).mean()), 3),
                           "well_consensus_accuracy": round(float((wpred[m] == t).mean()), 3)}
    conf = {t: {u: int(((types == t) & (pred == u) & lc).sum()) for u in classes} for t in classes}
    abstain = {}
    for thr in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        keep = (prob >= thr) & lc
        acc = round(float((pred[keep] == types[keep]).mean()), 3) if keep.any() else None
        abstain[str(thr)] = {"coverage": round(float(keep.sum() / lc.sum()), 3), "accuracy_kept": acc}
    # per-well macro accuracy: every well counts once, whatever its number of fields
    wells = sorted({g for g in groups[lc]})
    well_acc = [float((pred[(groups == g)] == types[groups == g]).mean()) for g in wells]
    return {"livecell_fields": int(lc.sum()), "livecell_wells": len(wells),
            "field_accuracy": round(float((pred[lc] == types[lc]).mean()), 3),
            "field_accuracy_per_well_mean": round(float(np.mean(well_acc)), 3),
            "field_accuracy_per_well_sd": round(float(np.std(well_acc)), 3),
            "well_consensus_accuracy": round(float((wpred[lc] == types[lc]).mean()), 3),
            "wells_right": int(sum(well[g] == g.split("/")[0] for g in wells)),
            "sartorius_shsy5y_field_accuracy": round(float((pred[~lc] == "SHSY5Y").mean()), 3) if (~lc).any() else None,
            "temperature": best_t, "held_out_log_loss": round(best_ll, 3),
            "per_type": per_type, "confusion": conf, "abstention": abstain}


def route_cv(meta: list[dict], f: dict[str, np.ndarray]) -> None:
    """--route auto against the general model on LIVECell's annotated fields, honestly: each field is routed by
    the classifier fitted without its well (well consensus over that well's fields, abstention as shipped), and
    its mask AP is that of research/per_type.py's fold models, which never saw it (weights/logs/per_type)."""
    from livecell_ray.model import route
    from livecell_ray.training import classifier as C

    x = f["cells"]
    y = np.array([m["type"] for m in meta])
    g = np.array([m["group"] for m in meta])
    classes = sorted(set(y))
    lp = C.leave_one_well_out(x, y, g, classes, C.ClassifierConfig())
    t = C.temperature(lp, y, classes)
    lp = lp / t
    lp = lp - np.logaddexp.reduce(lp, 1, keepdims=True)
    pred = np.array(classes)[lp.argmax(1)]
    thr = C.abstention_threshold(np.exp(lp.max(1)), pred == y, C.ClassifierConfig().target_accuracy, g)
    decided = route.decide([tuple(s.split("/")) for s in g], lp, classes, ["*", "BT474", "MCF7"], thr)
    folds = {}
    for k in (1, 2, 4, 5):
        p = ROOT / "weights" / "logs" / "per_type" / f"f{k}.json"
        if p.exists():
            d = json.loads(p.read_text())
            folds[d["field"]] = d
    rows = []
    for m, d in zip(meta, decided):
        stem = Path(m["path"]).stem
        if "annotated" not in m["path"]:
            continue
        fold = folds.get(stem)
        general = round(fold["general"]["AP"], 3) if fold else None
        typed = round(fold["type"]["AP"], 3) if fold else None
        routed = typed if d.routed_to != "*" and d.routed_to == m["type"] else general
        rows.append({"field": stem, "type": m["type"], "well_cell_type": str(d.well_cell_type),
                     "well_p": round(d.well_cell_type_probability, 3), "routed_to": d.routed_to,
                     "reason": d.route_reason, "general_mask_ap": general, "route_auto_mask_ap": routed})
    scored = [r for r in rows if r["general_mask_ap"] is not None]
    res = {"abstain_below": round(thr, 4), "temperature": round(t, 3), "fields": rows,
           "mean_general": round(float(np.mean([r["general_mask_ap"] for r in scored])), 3),
           "mean_route_auto": round(float(np.mean([r["route_auto_mask_ap"] for r in scored])), 3),
           "folds": len(scored)}
    (LOGS / "route_cv.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "fields"}))
    for r in rows:
        print(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["features", "cv", "ship", "route"])
    a = ap.parse_args()
    RUN.mkdir(parents=True, exist_ok=True)
    meta = fields()
    if a.step == "features":
        f = extract([m["path"] for m in meta])
        np.savez(RUN / "features.npz", **f)
        (RUN / "fields.json").write_text(json.dumps(meta, indent=1))
        return
    f = dict(np.load(RUN / "features.npz"))
    meta = json.loads((RUN / "fields.json").read_text())
    if a.step == "ship":
        from livecell_ray.model import models
        from livecell_ray.training import classifier

        cfg = classifier.ClassifierConfig()
        rows = [classifier.Field(m["path"], m["type"], m["group"]) for m in meta]
        spec = classifier.train(rows, f["cells"], cfg, models.resolve(cfg.model).sha256)
        spec["data"] = {"livecell_fields": sum(m["source"] == "livecell" for m in meta),
                        "sartorius_shsy5y_fields": sum(m["source"] == "sartorius" for m in meta),
                        "groups": len({m["group"] for m in meta}),
                        "made_by": "python research/celltype_cv.py features && python research/celltype_cv.py ship"}
        classifier.save(spec, str(ROOT / "weights" / "celltype.json"))
        held = spec["cross_validation"]
        print(json.dumps({k: held[k] for k in ("field_accuracy", "well_consensus_accuracy", "wells_right", "wells",
                                             "abstention")}))
        return
    if a.step == "route":
        route_cv(meta, f)
        return
    out = {}
    for which in ("embed", "cells", "both"):
        for augment in (False, True):
            name = f"{which}{'+aug' if augment else ''}"
            out[name] = score(cv(which, augment, meta, f), meta)
            s = out[name]
            print(f"{name:12s} field {s['field_accuracy']:.3f} (per well {s['field_accuracy_per_well_mean']:.3f} "
                  f"± {s['field_accuracy_per_well_sd']:.3f})  well consensus {s['well_consensus_accuracy']:.3f} "
                  f"({s['wells_right']}/{s['livecell_wells']} wells)  "
                  f"sartorius {s['sartorius_shsy5y_field_accuracy']}"
                  f"  T {s['temperature']:.2f}", flush=True)
    # the kept variant without Sartorius's SH-SY5Y fields: does that data pay?
    lc = [i for i, m in enumerate(meta) if m["source"] == "livecell"]
    sub = {k: v[lc] for k, v in f.items()}
    out["cells, LIVECell only"] = score(cv("cells", False, [meta[i] for i in lc], sub), [meta[i] for i in lc])
    s = out["cells, LIVECell only"]
    print(f"cells, LIVECell only: field {s['field_accuracy']:.3f}  well consensus {s['well_consensus_accuracy']:.3f}"
          f"  SHSY5Y {s['per_type']['SHSY5Y']['field_accuracy']:.2f}", flush=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / "cv.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
