"""Sartorius's 525 annotated Incucyte fields as pre-training for LIVECell, cross-validated (issue 31).
Question: does a model pre-trained on Sartorius (44,207 cells), then given the shipped stage-1 recipe on
LIVECell's annotated fields, beat the same stage 1 from the Usiigaci-only start, on LIVECell fields it never
saw and on Sartorius SH-SY5Y fields it never saw? Figures: weights/logs/sartorius*/ and research/README.md.

Stages, each a `livecell_ray.training.train` run with a fixed epoch count (so a run stopped by the end of a session
resumes from its last.pt with the same schedule, `python research/sartorius.py pretrain` again):
  pre     the Usiigaci-only small.pt (01890f0, never saw a LIVECell cell) -> Sartorius (every type; the
          held-out SH-SY5Y fields excluded; SH-SY5Y tiles twice) + Usiigaci sets 1-40 at LIVECell's scale,
          352 px tiles. No LIVECell field: one pre-training serves every fold honestly.
  fK      pre -> the shipped stage-1 recipe of research/livecell_student.py on fold K's data (the other
          annotated LIVECell fields as tiles x4 + Usiigaci), 30 epochs: the epochs the shipped small.pt's
          stage 1 had (weights/logs/gpu_livecell), so fK compares with logs/gpu_livecell/eval/eval_fK-stage1.
          f0 holds nothing out: the candidate to ship.
Every run keeps last.pt (nothing chosen on a score); each held-out field is scored once, at 704 and 832.

    python research/pack_livecell_gpu.py .gpu            # LIVECell + Usiigaci inputs (once)
    python research/sartorius.py pack                    # .sart/: Sartorius as mask folders (once)
    python research/sartorius.py pretrain [--epochs 10]
    python research/sartorius.py stage1 f1 [--epochs 30]  # f0 .. f5
    python research/sartorius.py eval f1                 # held-out LIVECell field + held-out SH-SY5Y fields
    python research/sartorius.py snapshot                # stripped weights and logs into weights/logs/sartorius
    python research/sartorius.py table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import livecell_student as ls  # noqa: E402  (the fold data of the shipped recipe)
from input_scale import FOLDS  # noqa: E402  (fold -> held-out annotated field)

from livecell_ray.training import dataset  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sartorius"
PACK = Path(".sart")
#: SARTORIUS_ARCH=big: the same chain for `big` (YOLOv8s-seg, from the Usiigaci-only big.pt), in its own folders.
ARCH = os.environ.get("SARTORIUS_ARCH", "small")
_SUFFIX = "" if ARCH == "small" else f"_{ARCH}"
PROJECT = Path(f"runs/sartorius{_SUFFIX}")
LOGS = Path(f"weights/logs/sartorius{_SUFFIX}")
#: The Usiigaci-only starting weights: small's packed by research/pack_livecell_gpu.py, big's (shipped as
#: weights/big.pt until the chain's f0 replaced it) read from the commit before that.
BASE = {"small": ".gpu/base.pt", "big": ".gpu/base_big.pt"}[ARCH]
BIG_BASE_COMMIT = "17c491d"
TILE = ls.TILE
SHSY5Y_REPEAT = 2  # LIVECell's hardest type: its Sartorius fields twice
ALL_FOLDS = {"f0": "all", **FOLDS}
#: Loader processes a run: 0 on this machine's 2 cores (loading in the training process), more on a GPU's.
WORKERS = int(os.environ.get("SARTORIUS_WORKERS", "0"))
KEEP_WEIGHTS = ("pre", "f0")  # committed: the pre-training a next session continues from, and the candidate


def held_out_shsy5y(names: list[str]) -> set[str]:
    """Every fifth SH-SY5Y field by name (15 of 74): never trained on by any run here, scored by every one."""
    return set(sorted(n for n in names if n.startswith("shsy5y_"))[::5])


def pack() -> None:
    """PACK/train/<field>/ and PACK/shsy5y_held/<field>/ (normalised uint8 plane + instance labels)."""
    from pack_gpu_data import write_field

    fields = dataset.read_coco(DATA / "annotations.json", DATA / "images")
    held = held_out_shsy5y([f.name for f in fields])
    for f in fields:
        write_field(PACK / ("shsy5y_held" if f.name in held else "train") / f.name, f)
    n = sum(len(f.labels.nonzero()[0]) > 0 for f in fields)
    print(f"{len(fields)} Sartorius fields ({n} with cells) packed into {PACK}: {len(held)} SH-SY5Y held out")


def pretrain_data() -> Path:
    """The pre-training data set (Sartorius tiles + Usiigaci tiles); returns its data.yaml."""
    out = PROJECT / "pre-data"
    if (out / "data.yaml").exists():
        return out / "data.yaml"
    train: list[dataset.LabelledField] = []
    for f in dataset.read_mask_folder(PACK / "train"):
        reps = SHSY5Y_REPEAT if f.name.startswith("shsy5y_") else 1
        train += [dataset.LabelledField(f"{t.name}_r{r}", t.image, t.labels)
                  for t in dataset.tile_field(f, TILE) for r in range(reps)]
    train += [t for f in dataset.read_mask_folder(ls.PACK / "usi") for t in dataset.tile_field(f, TILE)]
    val = dataset.read_mask_folder(PACK / "shsy5y_held")[:2]  # only ultralytics' closing check reads it
    dataset.write_yolo(train, out, "train")
    dataset.write_yolo(val, out, "val")
    (out / "prepared.json").write_text(json.dumps({"n_train": len(train), "tile": TILE,
                                                   "shsy5y_repeat": SHSY5Y_REPEAT}, indent=2))
    return dataset.write_data_yaml(out)


def run_train(name: str, data: Path, model: str, epochs: int, lr0: float) -> Path:
    """One resumable run at fixed epochs; returns its last.pt."""
    from livecell_ray.training.train import TrainConfig, train

    cfg = TrainConfig(data=str(data), model=model, epochs=epochs, imgsz=TILE, batch=16, project=str(PROJECT),
                      name=name, workers=WORKERS, seed=1, lr0=lr0, val=False)
    train(cfg, resume=True)
    return PROJECT / name / "weights" / "last.pt"


def pretrain_chunked(epochs: int, chunk: int, base: str) -> Path:
    """Pre-training in runs of ``chunk`` epochs, each from the last one's stripped weights, committed to
    LOGS/pre after each: a CPU pre-training longer than a session (`big`'s: about 5 h on 2 cores) goes on
    in the next session from the last finished chunk, where one long run would start again from scratch
    (its last.pt, with the optimizer state, lives in runs/, which a new checkout does not have). Each chunk
    is its own warm-up-free schedule at the same lr0; the log says how many ran."""
    from ultralytics.utils.torch_utils import strip_optimizer

    state = LOGS / "pre" / "chunks.json"
    done = json.loads(state.read_text())["chunks"] if state.exists() else 0
    while done * chunk < epochs:
        start = str(LOGS / "pre" / "last.pt") if done else base
        k = done + 1
        last = run_train(f"pre-c{k}", pretrain_data(), start, chunk, 1e-3)
        (LOGS / "pre").mkdir(parents=True, exist_ok=True)
        strip_optimizer(str(last), str(LOGS / "pre" / "last.pt"))
        shutil.copy(last.parent.parent / "results.csv", LOGS / "pre" / f"results_c{k}.csv")
        shutil.copy(last.parent.parent / "args.yaml", LOGS / "pre" / "args.yaml")
        state.write_text(json.dumps({"chunks": k, "chunk_epochs": chunk, "epochs": epochs, "base": base}) + "\n")
        print(f"pre-training chunk {k} ({k * chunk} of {epochs} epochs) -> {LOGS / 'pre' / 'last.pt'}", flush=True)
        done = k
    return LOGS / "pre" / "last.pt"


def pretrained() -> Path:
    """This machine's pre-training if it ran here, else the committed one (a fresh checkout continues from it)."""
    for pre in (PROJECT / "pre" / "weights" / "last.pt", LOGS / "pre" / "last.pt"):
        if pre.exists():
            return pre
    raise SystemExit(f"{PROJECT / 'pre'}: run `pretrain` first")


def stage1(fold: str, epochs: int) -> Path:
    """The shipped stage-1 recipe from the pre-trained model, on fold `fold`'s LIVECell data."""
    pre = pretrained()
    ls.PROJECT = PROJECT  # livecell_student writes its fold data under its PROJECT
    data = PROJECT / f"{fold}-data" / "data.yaml"
    if not data.exists():
        data = ls.build_data(fold, ALL_FOLDS[fold])
    return run_train(fold, data, str(pre), epochs, 1e-3)


def score(weights: str, fold: str) -> dict:
    """Mask AP etc. of `weights` on its held-out LIVECell field (if any) and the held-out SH-SY5Y fields."""
    from livecell_ray.config import InferenceConfig
    from livecell_ray.training import evaluate

    out: dict = {"weights": weights, "fold": fold}
    for imgsz in (704, 832):
        inf = InferenceConfig(imgsz=imgsz, half=False)
        if ALL_FOLDS[fold] != "all":
            res, _ = evaluate.run(weights, str(ls.PACK / "lc"), inference=inf, trust=True, select=[ALL_FOLDS[fold]])
            out[f"livecell_{imgsz}"] = _metrics(res["all"])
        res, _ = evaluate.run(weights, str(PACK / "shsy5y_held"), inference=inf, trust=True)
        out[f"shsy5y_{imgsz}"] = _metrics(res["all"])
    return out


def _metrics(m) -> dict:
    return {"AP": m.mask["AP"], "AP50": m.mask["AP50"], "AP75": m.mask["AP75"], "found": m.n_pred,
            "cells": m.n_gt, "count_error": m.count_error}


def snapshot(project: Path | None = None, logs: Path | None = None, keep: tuple[str, ...] = KEEP_WEIGHTS) -> None:
    """Each run's args and per-epoch results, the stripped last.pt of the runs in `keep`, and the run folder's
    JSON files (scores, schedules) into `logs` (committed; default weights/logs/sartorius*)."""
    from ultralytics.utils.torch_utils import strip_optimizer

    project, logs = project or PROJECT, logs or LOGS
    logs.mkdir(parents=True, exist_ok=True)
    project.mkdir(parents=True, exist_ok=True)  # a fresh checkout whose pre-training is all committed
    for run in sorted(p for p in project.iterdir() if (p / "weights" / "last.pt").exists()
                      and not p.name.startswith("pre-c")):  # chunks: pretrain_chunked keeps their logs
        dst = logs / run.name
        dst.mkdir(exist_ok=True)
        for name in ("args.yaml", "results.csv"):
            if (run / name).exists():
                shutil.copy(run / name, dst / name)
        if run.name in keep:  # the fold models' figures are in their eval_*.json
            strip_optimizer(str(run / "weights" / "last.pt"), str(dst / "last.pt"))
    for p in sorted(project.glob("*.json")):
        shutil.copy(p, logs / p.name)


def _baseline(fold: str) -> tuple[float, float]:
    """The like-for-like baseline's held-out LIVECell and SH-SY5Y mask AP at 704 for one fold: for `small`,
    the shipped recipe's stage 1 from the Usiigaci-only start (logs/gpu_livecell, no SH-SY5Y score); for
    `big`, `small`'s own Sartorius chain (logs/sartorius), the model `big` has to beat."""
    if ARCH == "small":
        old = Path(f"weights/logs/gpu_livecell/eval/eval_{fold}-stage1.json")
        ap = json.loads(old.read_text())["results"]["all"]["mask"]["AP"] if old.exists() else float("nan")
        return ap, float("nan")
    p = Path(f"weights/logs/sartorius/eval_{fold}.json")
    if not p.exists():
        return float("nan"), float("nan")
    d = json.loads(p.read_text())
    return d["livecell_704"]["AP"], d["shsy5y_704"]["AP"]


def table() -> str:
    """Markdown: each fold's held-out LIVECell field and the held-out SH-SY5Y fields against the baseline of
    `_baseline`, mean (sd) over folds."""
    import numpy as np

    rows, ap_new, ap_old = [], [], []
    for fold, field in FOLDS.items():
        p = LOGS / f"eval_{fold}.json"
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        o, o_sh = _baseline(fold)
        n = d["livecell_704"]["AP"]
        ap_new.append(n)
        ap_old.append(o)
        sh = f"{d['shsy5y_704']['AP']:.3f}" + ("" if np.isnan(o_sh) else f" ({o_sh:.3f})")
        rows.append(f"| {field} | {o:.3f} | {n:.3f} | {d['livecell_832']['AP']:.3f} | {sh} |")
    base = "stage 1 from Usiigaci-only" if ARCH == "small" else "small: Sartorius pre + stage 1"
    sh_head = "held-out Sartorius SH-SY5Y (704)" + ("" if ARCH == "small" else " (small's)")
    head = [f"| held-out field | {base} (704) | {ARCH}: Sartorius pre + stage 1 (704) | (832) | {sh_head} |",
            "| --- | --- | --- | --- | --- |"]
    if len(ap_new) > 1:
        rows.append(f"| mean (sd), {len(ap_new)} folds | {np.mean(ap_old):.3f} ({np.std(ap_old, ddof=1):.3f}) | "
                    f"{np.mean(ap_new):.3f} ({np.std(ap_new, ddof=1):.3f}) | | |")
    return "\n".join(head + rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("pack")
    pt = sub.add_parser("pretrain")
    pt.add_argument("--epochs", type=int, default=10)
    pt.add_argument("--base", default=BASE, help="starting weights (the Usiigaci-only small.pt or big.pt)")
    pt.add_argument("--chunk", type=int, default=0, help="epochs a run, each committed (0: one run)")
    s1 = sub.add_parser("stage1")
    s1.add_argument("fold", choices=sorted(ALL_FOLDS))
    s1.add_argument("--epochs", type=int, default=30)
    ev = sub.add_parser("eval")
    ev.add_argument("fold", choices=sorted(ALL_FOLDS))
    ev.add_argument("--weights", default=None, help="default: runs/sartorius/FOLD/weights/last.pt")
    ev.add_argument("--name", default=None, help="eval_NAME.json (default: the fold)")
    sub.add_parser("snapshot")
    sub.add_parser("table")
    a = p.parse_args()
    if a.cmd == "pretrain" and a.base == BASE and ARCH == "big" and not Path(BASE).exists():
        import subprocess

        Path(BASE).parent.mkdir(exist_ok=True)
        Path(BASE).write_bytes(subprocess.run(["git", "show", f"{BIG_BASE_COMMIT}:weights/big.pt"],
                                              capture_output=True, check=True).stdout)
    if a.cmd == "pack":
        pack()
    elif a.cmd == "pretrain" and a.chunk:
        print(pretrain_chunked(a.epochs, a.chunk, a.base))
    elif a.cmd == "pretrain":
        if not (PROJECT / "pre").exists() and (LOGS / "pre" / "last.pt").exists():
            print(f"{LOGS / 'pre' / 'last.pt'}: the committed pre-training, used as it is")
        else:
            print(run_train("pre", pretrain_data(), a.base, a.epochs, 1e-3))
    elif a.cmd == "stage1":
        print(stage1(a.fold, a.epochs))
    elif a.cmd == "eval":
        w = a.weights or str(PROJECT / a.fold / "weights" / "last.pt")
        res = score(w, a.fold)
        (PROJECT / f"eval_{a.name or a.fold}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k not in ("weights",)}, indent=1))
    elif a.cmd == "snapshot":
        snapshot()
    else:
        print(table())


if __name__ == "__main__":
    main()
