"""Does a per-cell-type segmentation model beat the general one on its type? Cross-validated where a type has
two annotated fields (BT474: B3, C3; MCF7: F4, G4). Figure: weights/README.md ("Per-type models").

For each such held-out field, start from that fold's general model (`runs/lc_student/fK-real`, trained on the
other four annotated fields plus Usiigaci, never on the held-out field) and train on for the same time two ways:
  type     the same type's other annotated field only (352 px tiles, half-tile overlap)  -> the per-type model
  general  the fold's own data again (all four other fields + Usiigaci)                 -> the control
Both keep last.pt (nothing chosen on a score) and are scored once on the held-out field, at small.pt's default
input (832), with LIVECell's protocol through the `segment` code path, fp32; so is the fold model itself.

    python research/per_type.py run [--minutes 7] [--folds f1,f2,f4,f5]
    python research/per_type.py table
    python research/per_type.py ship BT474,MCF7 [--minutes 7]   # weights/bt474.pt, weights/mcf7.pt

`ship` trains each shipped per-type model the same way on all of its type's annotated fields, from the
shipped small.pt (the recipe's run on all five fields), and copies its last.pt to weights/<type>.pt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import input_scale  # noqa: E402  (the fold -> held-out field map and the scorer)
import livecell_student as ls  # noqa: E402  (the fold's data and training run)

from livecell_ray.training import dataset  # noqa: E402

IMGSZ = 832
OUT = ls.PROJECT / "per_type"
TYPE_REPEAT = 16  # one field's 6 tiles, 16 times: an epoch of about the fold data's tile count / 10


def cell_type(field: str) -> str:
    return field.split("_", 1)[0]


def type_data(kind: str, held: str | None, name: str) -> Path:
    """A per-type run's data: tiles of the annotated fields of cell type ``kind``, ``held`` excluded."""
    lc = dataset.read_mask_folder(ls.PACK / "lc")
    same = [f for f in lc if cell_type(f.name) == kind and f.name != held]
    if not same:
        raise SystemExit(f"no annotated {kind} field (but the held-out one) to train a per-type model on")
    train = [dataset.LabelledField(f"{t.name}_r{r}", t.image, t.labels) for f in same
             for t in dataset.tile_field(f, ls.TILE, overlap=ls.TILE // 2) for r in range(TYPE_REPEAT)]
    out = ls.PROJECT / f"{name}-data"
    dataset.write_yolo(train, out, "train")
    dataset.write_yolo(same, out, "val")
    return dataset.write_data_yaml(out)


def ship(types: list[str], minutes: float) -> None:
    """Each type's model from the shipped small.pt, on all its annotated fields, into weights/<type>.pt."""
    import shutil

    for kind in types:
        type_data(kind, None, f"ship-{kind}")
        last = ls.train_run(f"ship-{kind}", "weights/small.pt", minutes / 60, workers=1, lr0=1e-3)
        shutil.copy(last, f"weights/{kind.lower()}.pt")
        print(f"weights/{kind.lower()}.pt from {last}", flush=True)


def run(folds: list[str], minutes: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        held = input_scale.FOLDS[fold]
        start = f"{ls.PROJECT}/{fold}-real/weights/last.pt"
        scores = {"fold": fold, "field": held, "minutes": minutes, "imgsz": IMGSZ,
                  "fold_model": input_scale.score(start, held, IMGSZ)}
        type_data(cell_type(held), held, f"{fold}-type")
        ls.build_data(f"{fold}-general", held)
        for variant in ("type", "general"):
            last = ls.train_run(f"{fold}-{variant}", start, minutes / 60, workers=1, lr0=1e-3)
            scores[variant] = input_scale.score(str(last), held, IMGSZ)
            print(fold, variant, scores[variant], flush=True)
        (OUT / f"{fold}.json").write_text(json.dumps(scores, indent=1))


def fold_table(out: Path, cols: tuple[str, ...], headers: tuple[str, ...]) -> str:
    """Markdown from a run's per-fold JSON files in ``out``: each held-out field's mask AP / AP75 / cells found
    per variant, then the mean (sd) of mask AP over folds."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("f*.json"))]
    lines = ["| held-out field (cells) | " + " | ".join(headers) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in rows:
        lines.append(f"| {r['field']} ({r[cols[-1]]['cells']}) | " + " | ".join(
            f"{r[c]['AP']:.3f} / {r[c]['AP75']:.3f} / {r[c]['found']}" for c in cols) + " |")
    stats = []
    for c in cols:
        ap = np.array([r[c]["AP"] for r in rows])
        stats.append(f"**{ap.mean():.3f}** ({ap.std(ddof=1):.3f})" if len(ap) > 1 else f"{ap.mean():.3f}")
    lines.append(f"| mean (sd) over {len(rows)} folds | " + " | ".join(stats) + " |")
    return "\n".join(lines)


def table() -> str:
    return fold_table(OUT, ("fold_model", "general", "type"),
                      ("fold model", "+ general, same time", "+ per-type, same time"))


def fold_parser(doc: str, folds: str) -> tuple[argparse.ArgumentParser, Any]:
    """The command line of a cross-validated experiment: ``run [--minutes M] [--folds F]`` and ``table``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--minutes", type=float, default=7.0)
    r.add_argument("--folds", default=folds)
    sub.add_parser("table")
    return p, sub


def main() -> None:
    p, sub = fold_parser(__doc__, "f1,f2,f4,f5")
    sh = sub.add_parser("ship")
    sh.add_argument("types")
    sh.add_argument("--minutes", type=float, default=7.0)
    a = p.parse_args()
    if a.cmd == "run":
        run(a.folds.split(","), a.minutes)
    elif a.cmd == "ship":
        ship(a.types.split(","), a.minutes)
    else:
        print(table())


if __name__ == "__main__":
    main()
