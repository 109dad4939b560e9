"""How many corrected fields does a new cell line need? (issue 35). HeLa in DIC at 63x (../shared/data/ctc_hela_dic,
0.19 um/px): the shipped default at the right pixel size, then fine-tuned from it on 1, 3, 5 and 10 frames of
sequence 01 (each run at most MINUTES of CPU on this machine), three draws of the frames each; every model
scored on all 42 frames of sequence 02 (never trained on, never used to choose anything): mask AP and count
error, mean and spread over the draws. Figures to weights/logs/hela/, the curve to docs/hela_curve.png.

    python research/hela_curve.py baseline
    python research/hela_curve.py run --frames 5 --draw 0 [--minutes 20] [--recipe gentle]
    python research/hela_curve.py all [--minutes 20] [--recipe gentle]   # every size and draw not yet scored
    python research/hela_curve.py table [--recipe gentle]   # markdown, and the plot
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELA = ROOT.parent / "shared" / "data" / "ctc_hela_dic"
PIXEL_SIZE = 0.19  # um/px, the challenge's description of DIC-C2DH-HeLa
RUNS = ROOT / "runs" / "hela"
LOGS = ROOT / "weights" / "logs" / "hela"
SIZES, DRAWS = (1, 3, 5, 10), (0, 1, 2)
BASE = ROOT / "weights" / "small.pt"
IMGSZ = 96  # the training input: each frame resized to exactly this (see run)


def score(weights: str, trained_at: float | None = None) -> dict:
    """Sequence 02 through the segmenter as `segment --pixel-size 0.19` runs it. ``trained_at``: the um/px a
    fine-tuned file was trained at, registered as `models add --pixel-size` records it, so that fields are
    resampled to it (a bare .pt has no scale: its fields would be taken at theirs)."""
    import os

    from livecell_ray.config import InferenceConfig
    from livecell_ray.model import registry
    from livecell_ray.training import dataset, evaluate

    if trained_at:
        os.environ["LIVECELL_RAY_MODELS"] = str(RUNS / "models.json")
        registry.add("hela-curve", weights, pixel_size=trained_at)
        weights = "hela-curve"
    test = [name for name, _, _ in dataset.ctc_frames(HELA) if name.startswith("02_")]
    res, _ = evaluate.run(weights, str(HELA), inference=InferenceConfig(half=False), trust=True, select=test,
                          pixel_size=PIXEL_SIZE)
    m = res["all"]
    return {"AP": m.mask["AP"], "AP50": m.mask["AP50"], "AP75": m.mask["AP75"], "found": m.n_pred,
            "cells": m.n_gt, "count_error": m.count_error, "frames_scored": len(test)}


def subset(k: int, draw: int) -> Path:
    """A CTC layout of k frames of sequence 01, drawn with seed ``draw``."""
    from livecell_ray.training import dataset

    frames = [f for f in dataset.ctc_frames(HELA) if f[0].startswith("01_")]
    pick = np.random.default_rng(draw).choice(len(frames), size=k, replace=False)
    out = RUNS / f"k{k}_d{draw}" / "ctc"
    if out.exists():
        shutil.rmtree(out)
    for i in sorted(pick):
        name, frame, seg = frames[i]
        for src, dst in ((frame, out / "01" / frame.name), (seg, out / f"01_{seg.parent.parent.name[3:]}" / "SEG"
                                                             / seg.name)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return out


#: Fine-tuning recipes tried (lr0, ultralytics overrides); "gentle": no mosaic or copy-paste, little rescaling,
#: the backbone frozen, a tenth of the learning rate.
RECIPES = {"default": (5e-4, {}),
           "gentle": (1e-4, {"mosaic": 0.0, "copy_paste": 0.0, "scale": 0.2, "freeze": 10})}


def run(k: int, draw: int, minutes: float, recipe: str = "default") -> dict:
    from livecell_ray.cli.training import training_scale
    from livecell_ray.training.train import DataConfig, TrainConfig, prepare_dataset, train

    data = subset(k, draw)
    # The frames at the network's input exactly (512 px -> 96): ultralytics resizes every training image to its
    # imgsz, while a field of known scale is never enlarged at inference, so a frame smaller than the input
    # would teach the cells 1.2x larger than they are then seen. 0.19 um/px x 512 / 96 = 1.01 um/px, near
    # small.pt's own working scale (1.05).
    scale = IMGSZ / 512
    assert abs(scale - training_scale(str(data), str(BASE), PIXEL_SIZE)) < 0.05  # about small.pt's 1.24 um/px
    name = f"k{k}_d{draw}" + ("" if recipe == "default" else f"_{recipe}")
    lr0, overrides = RECIPES[recipe]
    yaml = prepare_dataset(DataConfig(data=str(data), out=str(RUNS / f"{name}-data"), scale=scale))
    last = train(TrainConfig(data=str(yaml), model=str(BASE), epochs=300, imgsz=IMGSZ, batch=4, project=str(RUNS),
                             name=name, workers=0, seed=draw, lr0=lr0, time_hours=minutes / 60, val=False,
                             overrides=overrides),
                 resume=True)
    res = {"frames": k, "draw": draw, "minutes": minutes, "scale": scale, "recipe": recipe,
           **score(str(last), trained_at=PIXEL_SIZE / scale)}
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def table(recipe: str = "gentle") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = json.loads((LOGS / "baseline.json").read_text())
    rows = [f"recipe: {recipe}", "",
            "| corrected frames | mask AP, mean (sd) | count error, mean (sd) | draws | CPU minutes |",
            "| --- | --- | --- | --- | --- |",
            f"| 0 (shipped default) | {base['AP']:.3f} | {base['count_error']:.2f} | 1 | 0 |"]
    xs, ap, ap_sd = [0], [base["AP"]], [0.0]
    for k in SIZES:
        got = [g for g in (json.loads(p.read_text()) for p in sorted(LOGS.glob(f"k{k}_d*.json")))
               if g.get("recipe", "default") == recipe]
        if not got:
            continue
        a, c = np.array([g["AP"] for g in got]), np.array([g["count_error"] for g in got])
        sd = lambda v: f"{v.std(ddof=1):.3f}" if len(v) > 1 else "-"  # noqa: E731
        minutes = max(g["minutes"] for g in got)
        rows.append(f"| {k} | {a.mean():.3f} ({sd(a)}) | {c.mean():.2f} ({sd(c)}) | {len(got)} | {minutes:g} |")
        xs.append(k), ap.append(a.mean()), ap_sd.append(a.std(ddof=1) if len(a) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.errorbar(xs, ap, yerr=ap_sd, marker="o", capsize=3)
    ax.set_xlabel("corrected frames of sequence 01")
    ax.set_ylabel("mask AP on sequence 02 (42 frames)")
    ax.axhline(0.45, color="grey", ls=":", lw=1)
    ax.text(0.1, 0.455, "target (issue 35)", fontsize=7, color="grey")
    ax.set_title(f"HeLa DIC 63x: fine-tuned from small.pt ({recipe} recipe)", fontsize=9)
    fig.savefig(ROOT / "docs" / "hela_curve.png", dpi=110, bbox_inches="tight")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("baseline")
    r = sub.add_parser("run")
    r.add_argument("--frames", type=int, required=True)
    r.add_argument("--draw", type=int, default=0)
    r.add_argument("--minutes", type=float, default=20)
    r.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    a_ = sub.add_parser("all")
    a_.add_argument("--minutes", type=float, default=20)
    a_.add_argument("--recipe", choices=sorted(RECIPES), default="gentle")
    t_ = sub.add_parser("table")
    t_.add_argument("--recipe", choices=sorted(RECIPES), default="gentle")
    a = ap.parse_args()
    if a.cmd == "baseline":
        res = {"frames": 0, **score(str(BASE))}
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / "baseline.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
    elif a.cmd == "run":
        print(json.dumps(run(a.frames, a.draw, a.minutes, a.recipe), indent=1))
    elif a.cmd == "all":
        for k in SIZES:
            for d in DRAWS:
                tag = "" if a.recipe == "default" else f"_{a.recipe}"
                if not (LOGS / f"k{k}_d{d}{tag}.json").exists():
                    print(json.dumps(run(k, d, a.minutes, a.recipe), indent=1), flush=True)
    else:
        print(table(a.recipe))


if __name__ == "__main__":
    main()
