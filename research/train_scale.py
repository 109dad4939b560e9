"""Does training at the scale small.pt segments at (LIVECell enlarged 832/704 = 1.18x) beat training on at native
scale? Cross-validated over the five annotated fields. Figure: weights/README.md ("Training at the input scale").

small.pt segments LIVECell's fields enlarged to 832 px (research/input_scale.py) but was trained on them at their
native scale. For each fold, start from that fold's model (`runs/lc_student/fK-real`, never trained on the held-out
field) and train on for the same time two ways, both from the same start, rate and tiles of 352 px:
  general  the fold's own data at native scale (the control; per_type.py's, trained here where missing)
  scaled   the same fields (LIVECell and Usiigaci) enlarged 1.18x first, then tiled
Both keep last.pt (nothing chosen on a score) and are scored once on the held-out field at 832, with LIVECell's
protocol through the `segment` code path, fp32.

    python research/train_scale.py run [--minutes 7] [--folds f1,f2,f3,f4,f5]
    python research/train_scale.py table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import input_scale  # noqa: E402  (the fold -> held-out field map and the scorer)
import livecell_student as ls  # noqa: E402  (the fold's data and training run)
import per_type  # noqa: E402  (the table)

from livecell_ray.training import dataset  # noqa: E402

IMGSZ = 832
SCALE = IMGSZ / 704
OUT = ls.PROJECT / "train_scale"


def scaled_data(run: str, held: str) -> Path:
    """The control's data (livecell_student.build_data) with every field enlarged by SCALE before tiling."""
    lc = [dataset.resize_field(f, SCALE) for f in dataset.read_mask_folder(ls.PACK / "lc")]
    train = [dataset.LabelledField(f"{t.name}_r{r}", t.image, t.labels)
             for f in lc if f.name != held
             for t in dataset.tile_field(f, ls.TILE, overlap=ls.TILE // 2) for r in range(ls.LC_REPEAT)]
    train += [t for f in dataset.read_mask_folder(ls.PACK / "usi")
              for t in dataset.tile_field(dataset.resize_field(f, SCALE), ls.TILE)]
    out = ls.PROJECT / f"{run}-data"
    dataset.write_yolo(train, out, "train")
    dataset.write_yolo([f for f in lc if f.name == held], out, "val")
    (out / "prepared.json").write_text(json.dumps({"run": run, "fold": held, "scale": SCALE,
                                                   "n_train": len(train)}, indent=2))
    return dataset.write_data_yaml(out)


def run(folds: list[str], minutes: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        held = input_scale.FOLDS[fold]
        start = f"{ls.PROJECT}/{fold}-real/weights/last.pt"
        scores = {"fold": fold, "field": held, "minutes": minutes, "imgsz": IMGSZ,
                  "fold_model": input_scale.score(start, held, IMGSZ)}
        general = ls.PROJECT / f"{fold}-general" / "weights" / "last.pt"
        if not general.exists():
            ls.build_data(f"{fold}-general", held)
            general = ls.train_run(f"{fold}-general", start, minutes / 60, workers=1, lr0=1e-3)
        scores["general"] = input_scale.score(str(general), held, IMGSZ)
        scaled_data(f"{fold}-scaled", held)
        last = ls.train_run(f"{fold}-scaled", start, minutes / 60, workers=1, lr0=1e-3)
        scores["scaled"] = input_scale.score(str(last), held, IMGSZ)
        print(fold, scores, flush=True)
        (OUT / f"{fold}.json").write_text(json.dumps(scores, indent=1))


def table() -> str:
    return per_type.fold_table(OUT, ("fold_model", "general", "scaled"),
                               ("fold model", "+ native scale, same time", "+ enlarged 1.18x, same time"))


def main() -> None:
    a = per_type.fold_parser(__doc__, "f1,f2,f3,f4,f5")[0].parse_args()
    if a.cmd == "run":
        run(a.folds.split(","), a.minutes)
    else:
        print(table())


if __name__ == "__main__":
    main()
