"""Classify-then-segment's decision: which model each field goes to under ``--route auto``.

A plate's well holds one cell line, so a well's type is decided from all its fields and timepoints at once
(their summed log-probabilities: independent looks at the same cells), not field by field, where one odd
field (debris, focus, an empty corner) would send itself to another type's model. A plate map's
``cell_line`` is the experimenter's word and wins over any prediction. Where the evidence is weak (the well's
calibrated probability below the classifier's abstention threshold, chosen by cross-validation) the field
goes to the general model: a per-type model on the wrong type costs more accuracy than it gains on the right
one (issue 36). ``route_reason`` says which of the three decided.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: route_reason values.
PLATE_MAP, CONSENSUS, ABSTAINED, UNCLASSIFIED = "plate map", "well consensus", "abstained", "not classified"


@dataclass(frozen=True)
class Route:
    """One field's routing: its own prediction, its well's, and the model key it goes to."""

    cell_type_predicted: str
    cell_type_probability: float
    well_cell_type: str
    well_cell_type_probability: float
    routed_to: str
    route_reason: str


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def model_for(cell_type: str, model_keys: Iterable[str], default: str = "*") -> str:
    """The model key serving ``cell_type`` (matched without case or punctuation: MCF-7 is MCF7), else the
    general model."""
    keys = {_key(k): k for k in model_keys if k != default}
    return keys.get(_key(cell_type), default) if cell_type else default


def decide(wells: list[tuple[str, str]], logp: np.ndarray, classes: list[str], model_keys: Iterable[str],
           abstain_below: float = 0.0, cell_lines: dict[tuple[str, str], str] | None = None,
           default: str = "*") -> list[Route]:
    """Each field's route. ``wells``: each field's (plate, well); ``logp``: its calibrated log-probabilities
    over ``classes`` (a row of NaN: the field could not be classified); ``cell_lines``: the plate map's
    ``cell_line`` by (plate, well), which wins where given."""
    logp = np.asarray(logp, float).reshape(len(wells), len(classes))
    keys = list(model_keys)
    ok = ~np.isnan(logp).any(axis=1)
    summed: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros(len(classes)))
    for w, row, good in zip(wells, logp, ok):
        if good:
            summed[w] = summed[w] + row
    well_type: dict[tuple[str, str], tuple[str, float]] = {}
    for w, s in summed.items():
        post = np.exp(s - np.logaddexp.reduce(s))  # the well's posterior under a flat prior
        k = int(np.argmax(post))
        well_type[w] = (classes[k], float(post[k]))
    out = []
    for w, row, good in zip(wells, logp, ok):
        own = (classes[int(np.argmax(row))], float(np.exp(np.max(row)))) if good else ("", float("nan"))
        wt, wp = well_type.get(w, ("", float("nan")))
        line = (cell_lines or {}).get(w)
        if line:
            out.append(Route(*own, str(line), 1.0, model_for(str(line), keys, default), PLATE_MAP))
        elif not wt:
            out.append(Route(*own, "", float("nan"), default, UNCLASSIFIED))
        elif wp < abstain_below:
            out.append(Route(*own, wt, wp, default, ABSTAINED))
        else:
            out.append(Route(*own, wt, wp, model_for(wt, keys, default), CONSENSUS))
    return out
