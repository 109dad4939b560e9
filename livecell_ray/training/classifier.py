"""Training and cross-validating the field cell-type classifier (the seed study's classify-then-segment).

File names often carry no cell type, yet per-type models need one. The classifier is a calibrated logistic
regression over what the general segmentation model finds in a field: the size, shape, density and texture
distributions of its cells (:func:`livecell_ray.model.classify.cell_features`). A network trained from scratch
on crops of a few wells learnt those wells (their density, focus, day) and named 10 of 23 new fields right
(issue 36); the cells' morphology, as a model trained on LIVECell's cells sees it, carries over to new wells.

Every figure is leave-one-well-out: a plate's well holds one cell line and its fields share a look, so no
well has fields on both sides. Each (type, well) group weighs the same within its type and each type the
same, so a well imaged 15 times does not outvote three wells imaged once. The temperature (calibration) and
the abstention threshold are chosen on the held-out predictions, and the report says how they were chosen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livecell_ray.model.classify import Head
from livecell_ray.plate.manifest import parse_name

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class ClassifierConfig:
    """How the classifier is fitted and how it abstains."""

    c: float = 0.1  # inverse L2 strength of the logistic regression (standardised features)
    components: int | None = 64  # principal axes kept before the regression (None: all)
    # Routing abstains (sends a well to the general model) below the calibrated probability at which the
    # held-out fields kept were right this often.
    target_accuracy: float = 0.95
    model: str = "small"  # the general segmentation model whose cells are the features
    pixel_size_um: float = 1.24  # the training fields' scale when neither a name nor a file gives one


@dataclass(frozen=True)
class Field:
    """One training field: its file, cell type and the group it is held out with (its plate's well)."""

    path: str
    cell_type: str
    group: str


def field_type(path: Path) -> str | None:
    """The cell type from a LIVECell-style file name, or None."""
    meta = parse_name(path.name)
    return (meta or {}).get("cell_type") or None


def collect(folders: Iterable[str]) -> list[Field]:
    """Fields whose names carry their type (LIVECell's convention), each once (a name in two folders is one
    field), grouped by (plate, well): a LIVECell plate is one cell type, so its plate is its type."""
    seen: dict[str, Field] = {}
    for folder in folders:
        for p in sorted(q for q in Path(folder).iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
            meta = parse_name(p.name)
            if meta and meta.get("cell_type") and p.name not in seen:
                seen[p.name] = Field(str(p), meta["cell_type"], f"{meta['plate']}/{meta['well']}")
    return list(seen.values())


def features(fields: list[Field], cfg: ClassifierConfig,
             progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Each field's cell features, from the general model's segmentation of it, as segment normalises it."""
    from livecell_ray.model.classify import FieldFeatures
    from livecell_ray.plate.imaging import normalize, read_image_with_info

    extract = FieldFeatures(cfg.model)
    rows = []
    for k, f in enumerate(fields):
        raw, info = read_image_with_info(f.path)
        rows.append(extract.cells(normalize(raw), info.pixel_size or cfg.pixel_size_um))
        if progress:
            progress(k + 1, len(fields))
    return np.asarray(rows, np.float32)


def fit_head(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: list[str], c: float = 0.1,
             components: int | None = 64) -> Head:
    """A logistic regression on field features, with each group weighted as the module says.

    The standardised features are first projected on their ``components`` principal axes (fitted on the
    training fields only), which regularises many features seen on a few dozen wells; the projection is
    folded into the head's coefficients, so a :class:`Head` is linear in the features either way."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    w = np.ones(len(y))
    for t in set(y):
        gs = set(groups[y == t])
        for g in gs:
            m = (y == t) & (groups == g)
            w[m] = 1.0 / (m.sum() * len(gs))
    w *= len(y) / w.sum()
    proj = np.eye(z.shape[1])
    if components and components < min(z.shape):
        _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
        proj = vt[:components].T  # (features, components)
    zp = z @ proj
    sd = zp.std(0) + 1e-6
    lr = LogisticRegression(C=c, max_iter=500, tol=1e-4)
    lr.fit(zp / sd, y, sample_weight=w)
    coef = np.zeros((len(classes), x.shape[1]))
    inter = np.full(len(classes), -1e3)  # a class no training field had is never predicted
    for k, cls in enumerate(classes):
        if cls in lr.classes_:
            j = list(lr.classes_).index(cls)
            coef[k], inter[k] = proj @ (lr.coef_[j] / sd), lr.intercept_[j]
    return Head(list(classes), mean, scale, coef, inter)


def leave_one_well_out(x: np.ndarray, types: np.ndarray, groups: np.ndarray, classes: list[str],
                       cfg: ClassifierConfig, extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                       ) -> np.ndarray:
    """Each field's log-probabilities (temperature 1) from a head fitted without its group; ``extra``:
    (features, types, groups) of rows only ever trained on (e.g. augmented copies, keyed by their group)."""
    logp = np.zeros((len(x), len(classes)))
    for g in sorted(set(groups)):
        tr, te = groups != g, groups == g
        xs, ys, gs = x[tr], types[tr], groups[tr]
        if extra is not None:
            keep = extra[2] != g
            xs, ys, gs = (np.concatenate([xs, extra[0][keep]]), np.concatenate([ys, extra[1][keep]]),
                          np.concatenate([gs, extra[2][keep]]))
        head = fit_head(xs, ys, gs, classes, cfg.c, cfg.components)
        logp[te] = head.log_proba(x[te], temperature=1.0)
    return logp


def temperature(logp: np.ndarray, types: np.ndarray, classes: list[str]) -> float:
    """The temperature minimising the held-out log-loss: probabilities that mean what they say."""
    idx = np.array([classes.index(t) for t in types])
    best, best_ll = 1.0, np.inf
    for t in np.geomspace(0.25, 8, 61):
        lp = logp / t
        lp = lp - np.logaddexp.reduce(lp, 1, keepdims=True)
        ll = -lp[np.arange(len(idx)), idx].mean()
        if ll < best_ll:
            best, best_ll = float(t), float(ll)
    return best


def abstention_threshold(prob: np.ndarray, correct: np.ndarray, target: float,
                         groups: np.ndarray | None = None) -> float:
    """The lowest calibrated probability above which the held-out fields kept are right ``target`` of the
    time (0: keep every field when all of them are), each group (well) weighing the same."""
    w = np.ones(len(prob)) if groups is None else np.array([1.0 / (groups == g).sum() for g in groups])
    order = np.argsort(-prob)
    hits = np.cumsum((w * correct)[order]) / np.cumsum(w[order])
    ok = np.nonzero(hits >= target)[0]
    if not len(ok) or ok[-1] == len(order) - 1:
        return 0.0 if len(ok) else 1.0
    return float(prob[order][ok[-1]])


def well_consensus(logp: np.ndarray, groups: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each field's well type: the argmax of its group's summed log-probabilities."""
    out = np.empty(len(groups), object)
    for g in set(groups):
        m = groups == g
        out[m] = classes[int(logp[m].sum(0).argmax())]
    return out


def report(logp: np.ndarray, types: np.ndarray, groups: np.ndarray, classes: list[str], t: float) -> dict[str, Any]:
    """Held-out accuracy per type, field by field and with well consensus, its spread over wells, and the
    confusion matrix."""
    lp = logp / t
    lp = lp - np.logaddexp.reduce(lp, 1, keepdims=True)
    pred = np.array(classes)[lp.argmax(1)]
    wpred = well_consensus(lp, groups, classes)
    wells = sorted(set(groups))
    per_well = [float((pred[groups == g] == types[groups == g]).mean()) for g in wells]
    per_type = {c: {"fields": int((types == c).sum()), "wells": len(set(groups[types == c])),
                    "field_accuracy": round(float((pred[types == c] == c).mean()), 3),
                    "well_consensus_accuracy": round(float((wpred[types == c] == c).mean()), 3)}
                for c in classes if (types == c).any()}
    return {"fields": len(types), "wells": len(wells),
            "field_accuracy": round(float((pred == types).mean()), 3),
            "field_accuracy_per_well": {"mean": round(float(np.mean(per_well)), 3),
                                        "sd": round(float(np.std(per_well)), 3)},
            "well_consensus_accuracy": round(float((wpred == types).mean()), 3),
            "wells_right": int(sum(wpred[groups == g][0] == types[groups == g][0] for g in wells)),
            "per_type": per_type,
            "confusion": {c: {u: int(((types == c) & (pred == u)).sum()) for u in classes
                              if ((types == c) & (pred == u)).any()} for c in classes if (types == c).any()}}


def train(fields: list[Field], x: np.ndarray, cfg: ClassifierConfig, model_sha256: str) -> dict[str, Any]:
    """Cross-validate (leave one well out), calibrate, choose the abstention threshold, then fit on every field:
    the classifier's JSON spec (``FieldClassifier`` loads it), its cross-validated report inside."""
    types = np.array([f.cell_type for f in fields])
    groups = np.array([f.group for f in fields])
    classes = sorted(set(types))
    if len(classes) < 2:
        raise ValueError(f"a classifier needs fields of two cell types or more (got {classes})")
    single = [c for c in classes if len(set(groups[types == c])) < 2]
    if single:
        raise ValueError(f"every type needs fields from two wells or more, so that one can be held out: "
                         f"{', '.join(single)} {'has' if len(single) == 1 else 'have'} one")
    logp = leave_one_well_out(x, types, groups, classes, cfg)
    t = temperature(logp, types, classes)
    lp = logp / t
    lp = lp - np.logaddexp.reduce(lp, 1, keepdims=True)
    pred = np.array(classes)[lp.argmax(1)]
    threshold = abstention_threshold(np.exp(lp.max(1)), pred == types, cfg.target_accuracy, groups)
    cv = report(logp, types, groups, classes, t)
    kept = np.exp(lp.max(1)) >= threshold
    cv["abstention"] = {"below": round(threshold, 4), "target_accuracy": cfg.target_accuracy,
                        "fields_kept": round(float(kept.mean()), 3),
                        "accuracy_kept": round(float((pred[kept] == types[kept]).mean()), 3) if kept.any() else None}
    head = fit_head(x, types, groups, classes, cfg.c, cfg.components)
    head.temperature = t
    return {"kind": "field-features", "features": {"weights": cfg.model, "sha256": model_sha256, "use": "cells",
                                                   "pixel_size_um": cfg.pixel_size_um},
            "head": head.to_json(), "abstain_below": round(threshold, 4), "config": asdict(cfg),
            "cross_validation": {"protocol": "leave one well out (plate/well), temperature and abstention chosen "
                                             "on the held-out predictions", **cv}}


def save(spec: dict[str, Any], path: str) -> None:
    """The classifier as JSON (no pickle: loading it runs no code)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(spec, indent=1) + "\n")
