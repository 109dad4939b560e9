"""Noisy student on LIVECell, cross-validated by leaving one annotated field (one well) out.
Question: do pseudo-labelled unlabelled LIVECell fields beat the same training time on the labelled ones
alone, and what does the shipped recipe score on a LIVECell field it never saw? Figure: weights/README.md.

Each fold (one per annotated field, each its own well, plus 'all' with nothing held out: the shipped
candidate) trains in two stages, every one a `livecell_ray.training.train` run:
  1  stage1  base weights -> annotated fields but the held-out one (native scale, 352 px tiles, each
             tile 4 times) + Usiigaci sets 1-40 at LIVECell's scale
  2a real    stage 1 -> the same data, T2 more                      (the control, at equal time)
  2b pseudo  stage 1 -> the same data + the unlabelled fields pseudo-labelled by stage 1 with TTA,
             confident cells of plausible shape only (livecell_ray.training.pseudolabel)
The teacher of a fold never saw its held-out field, and no checkpoint, threshold or variant is chosen
on it: every run keeps last.pt, and the held-out field is scored once per run (`eval`).
Inputs come from research/pack_livecell_gpu.py; research/gpu_livecell.sh runs all folds on one GPU.

    python research/livecell_student.py data RUN FOLD [--pseudo DIR]
    python research/livecell_student.py train RUN MODEL HOURS [--workers W] [--lr0 LR]
    python research/livecell_student.py pseudo TEACHER OUT_DIR
    python research/livecell_student.py eval WEIGHTS FOLD OUT_JSON
    python research/livecell_student.py table [RUNS_DIR]      # research/README.md's table from the eval_*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from livecell_ray.training import dataset

PACK = Path(".gpu")
PROJECT = Path("runs/lc_student")
TILE = 352
LC_REPEAT = 4  # annotated LIVECell tiles weigh as much as the Usiigaci tiles they train beside


def _annotated(fold: str) -> list[dataset.LabelledField]:
    """The packed annotated LIVECell fields, after checking that `fold` names one of them (or is 'all')."""
    lc = dataset.read_mask_folder(PACK / "lc")
    if fold != "all" and fold not in {f.name for f in lc}:
        raise SystemExit(f"fold {fold!r}: not an annotated field ({', '.join(f.name for f in lc)})")
    return lc


def train_tiles(fold: str, pseudo: str | None = None) -> list[dataset.LabelledField]:
    """The training tiles of one fold (its held-out field left out), with the pseudo-labelled fields if given."""
    train = [dataset.LabelledField(f"{t.name}_r{r}", t.image, t.labels)
             for f in _annotated(fold) if f.name != fold
             for t in dataset.tile_field(f, TILE, overlap=TILE // 2) for r in range(LC_REPEAT)]
    train += [t for f in dataset.read_mask_folder(PACK / "usi") for t in dataset.tile_field(f, TILE)]
    if pseudo:
        train += [t for f in dataset.read_mask_folder(pseudo) for t in dataset.tile_field(f, TILE)]
    return train


def build_data(run: str, fold: str, pseudo: str | None = None) -> Path:
    """The YOLO-seg data set of one run; returns its data.yaml."""
    lc = _annotated(fold)
    train = train_tiles(fold, pseudo)
    val = [f for f in lc if f.name == fold] or lc[:1]  # only ultralytics' own final check reads it
    out = PROJECT / f"{run}-data"
    dataset.write_yolo(train, out, "train")
    dataset.write_yolo(val, out, "val")
    (out / "prepared.json").write_text(json.dumps({"run": run, "fold": fold, "pseudo": pseudo,
                                                   "n_train": len(train), "n_val": len(val)}, indent=2))
    return dataset.write_data_yaml(out)


def train_run(run: str, model: str, hours: float, workers: int, lr0: float) -> Path:
    """Fine-tune `model` on the run's data for `hours`; last.pt is what every later step reads."""
    from livecell_ray.training.train import TrainConfig, train

    cfg = TrainConfig(data=str(PROJECT / f"{run}-data" / "data.yaml"), model=model, epochs=1000, imgsz=TILE,
                      batch=16, project=str(PROJECT), name=run, workers=workers, seed=1, time_hours=hours,
                      lr0=lr0, val=False)
    train(cfg, resume=False)
    return PROJECT / run / "weights" / "last.pt"


def pseudo_labels(teacher: str, out: str) -> None:
    """Pseudo-label the packed unlabelled fields with the teacher (TTA, filtered); one summary line."""
    from livecell_ray.training.pseudolabel import pseudo_label

    rows = pseudo_label(teacher, PACK / "unl", out, trust_weights=True)
    (Path(out) / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"{teacher}: {sum(r['kept'] for r in rows)} of {sum(r['predicted'] for r in rows)} cells kept "
          f"on {len(rows)} fields")


def score(weights: str, fold: str, out: str) -> None:
    """LIVECell-protocol metrics of `weights` on one packed annotated field, fp32 as on a CPU."""
    from livecell_ray.config import InferenceConfig
    from livecell_ray.training import evaluate

    select = None if fold == "all" else [fold]
    results, info = evaluate.run(weights, str(PACK / "lc"), inference=InferenceConfig(half=False), trust=True,
                                 select=select)
    Path(out).write_text(json.dumps(evaluate.to_json(results, {**info, "fold": fold}), indent=1))
    m = results["all"]
    print(f"{weights} on {fold}: mask AP {m.mask['AP']:.3f} AP75 {m.mask['AP75']:.3f} cells {m.n_pred}/{m.n_gt}")


def table(project: Path = PROJECT) -> str:
    """Markdown: each held-out field's mask AP / AP75 / cells found per stage, then mean (sd) over folds."""
    import numpy as np

    stages = ("base", "stage1", "real", "pseudo")
    runs: dict[str, dict[str, dict]] = {}
    for p in sorted(project.glob("eval_*.json")):
        d = json.loads(p.read_text())
        if d["fold"] != "all":
            runs.setdefault(d["fold"], {})[p.stem.rsplit("-", 1)[1]] = d["results"]["all"]
    head = "| held-out field (cells) | " + " | ".join(f"{s}: mask AP / AP75 / found" for s in stages) + " |"
    lines = [head, "|" + " --- |" * (len(stages) + 1)]
    for fold, by in runs.items():
        n_gt = next(iter(by.values()))["n_gt"]
        cells = [f"{by[s]['mask']['AP']:.3f} / {by[s]['mask']['AP75']:.3f} / {by[s]['n_pred']}" if s in by else "-"
                 for s in stages]
        lines.append(f"| {fold} ({n_gt}) | " + " | ".join(cells) + " |")
    stats = []
    for s in stages:
        ap = np.array([by[s]["mask"]["AP"] for by in runs.values() if s in by])
        err = np.array([by[s]["count_error"] for by in runs.values() if s in by])
        stats.append(f"**{ap.mean():.3f}** ({ap.std(ddof=1):.3f}); count err {err.mean():.2f}" if len(ap) > 1
                     else "-")
    lines.append(f"| mean (sd) over {len(runs)} folds | " + " | ".join(stats) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("run")
    d.add_argument("fold")
    d.add_argument("--pseudo")
    t = sub.add_parser("train")
    t.add_argument("run")
    t.add_argument("model")
    t.add_argument("hours", type=float)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--lr0", type=float, default=1e-3)
    s = sub.add_parser("pseudo")
    s.add_argument("teacher")
    s.add_argument("out")
    e = sub.add_parser("eval")
    e.add_argument("weights")
    e.add_argument("fold")
    e.add_argument("out")
    tb = sub.add_parser("table")
    tb.add_argument("runs", nargs="?", default=str(PROJECT))
    a = p.parse_args()
    if a.cmd == "data":
        print(build_data(a.run, a.fold, a.pseudo))
    elif a.cmd == "train":
        print(train_run(a.run, a.model, a.hours, a.workers, a.lr0))
    elif a.cmd == "pseudo":
        pseudo_labels(a.teacher, a.out)
    elif a.cmd == "eval":
        score(a.weights, a.fold, a.out)
    else:
        print(table(Path(a.runs)))


if __name__ == "__main__":
    main()
