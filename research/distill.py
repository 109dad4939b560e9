"""`big` teaches `small`: LIVECell's unlabelled fields labelled by the Sartorius-chain `big`, cross-validated
(issue 31). Question: the default model has to stay YOLOv8n-seg (its CPU cost a field within 1.5x), and `big`
segments held-out LIVECell fields better (mask AP 0.258 against 0.204 at 832, research/README.md); does
`small`, given `big`'s cells on the 35 packed unlabelled LIVECell fields beside the stage-1 data, close part of
that gap on the field each fold holds out?

Per fold K (the same folds as research/sartorius.py):
  teacher   `big`'s fold model runs/sartorius_big/fK (never saw fK's field; f0: weights/big.pt), its ordinary
            output (its input of 832, confidence 0.25, no TTA) with livecell_ray.training.pseudolabel's shape
            filters: the earlier pseudo-label run (research/README.md) kept only confident cells (0.4, TTA)
            and its student learned that the rest was background
  student   `small`'s committed Sartorius pre-training (weights/logs/sartorius/pre) -> stage 1 on fold K's
            data + the teacher's fields (tiles, once each), at the optimizer steps of the 30 epochs that
            `small`'s chain fold had on its data alone (fewer epochs over more tiles): equal compute, so the
            paired difference against weights/logs/sartorius/eval_fK.json is the teacher's fields alone.
Every run keeps last.pt; each held-out field is scored once (704 and 832, as sartorius.py).

    python research/distill.py pseudo f1        # runs/distill/f1-pseudo (about 20 s)
    python research/distill.py stage1 f1        # about 17 CPU minutes on 2 cores; resumes from its last.pt
    python research/distill.py eval f1
    python research/distill.py table            # against small's chain, paired per fold
    nohup bash research/distill.sh > runs/distill.log 2>&1 &   # every fold, held-out ones first
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import livecell_student as ls  # noqa: E402
import sartorius as sa  # noqa: E402  (ARCH small: its folds, scoring and pre-training)

if sa.ARCH != "small":
    raise SystemExit("research/distill.py trains `small`: unset SARTORIUS_ARCH")
PROJECT = Path("runs/distill")
LOGS = Path("weights/logs/distill")
CHAIN = Path("weights/logs/sartorius")  # small's Sartorius chain: the paired baseline
EPOCHS = 30  # the chain's stage 1


def teacher(fold: str) -> str:
    """`big`'s model that never saw the fold's held-out field."""
    w = Path("weights/big.pt") if fold == "f0" else Path(f"runs/sartorius_big/{fold}/weights/last.pt")
    if not w.exists():
        raise SystemExit(f"{w}: big's fold model is not on this machine; "
                         f"`FOLDS={fold} SARTORIUS_ARCH=big bash research/sartorius.sh` rebuilds it")
    return str(w)


def pseudo(fold: str) -> Path:
    """The teacher's cells on the packed unlabelled LIVECell fields, as a mask folder."""
    from livecell_ray.training.pseudolabel import PseudoConfig, pseudo_label

    out = PROJECT / f"{fold}-pseudo"
    rows = pseudo_label(teacher(fold), ls.PACK / "unl", out, PseudoConfig(conf=0.25, tta=False), trust_weights=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"{fold}: {sum(r['kept'] for r in rows)} of {sum(r['predicted'] for r in rows)} cells kept "
          f"on {len(rows)} fields", flush=True)
    return out


def stage1(fold: str) -> Path:
    """`small`'s pre-training -> the fold's stage-1 data + the teacher's fields, at the chain's step count."""
    ls.PROJECT = PROJECT
    data = PROJECT / f"{fold}-data" / "data.yaml"
    if not data.exists():
        pseudo_dir = PROJECT / f"{fold}-pseudo"
        if not (pseudo_dir / "summary.json").exists():
            pseudo(fold)
        data = ls.build_data(fold, sa.ALL_FOLDS[fold], str(pseudo_dir))
    n = json.loads((data.parent / "prepared.json").read_text())["n_train"]
    n_base = len(ls.train_tiles(sa.ALL_FOLDS[fold]))  # the chain's fold data: the same tiles, no teacher's fields
    epochs = max(1, math.floor(EPOCHS * n_base / n + 0.5))
    (PROJECT / f"{fold}-schedule.json").write_text(json.dumps({"tiles": n, "base_tiles": n_base, "epochs": epochs}))
    sa.PROJECT = PROJECT
    return sa.run_train(fold, data, str(sa.pretrained()), epochs, 1e-3)


def snapshot() -> None:
    """Scores, schedules, args and per-epoch results into weights/logs/distill (committed), as sartorius.py's
    snapshot does; f0's weights too, and each fold's pseudo-label summary."""
    import shutil

    sa.snapshot(PROJECT, LOGS, keep=("f0",))
    for p in sorted(PROJECT.glob("*-pseudo/summary.json")):
        shutil.copy(p, LOGS / f"{p.parent.name}.json")


def table() -> str:
    """Markdown: each fold's held-out field, small's chain against the student, at 704 and 832, paired."""
    import numpy as np

    rows, d704, d832 = [], [], []
    for fold, field in sa.FOLDS.items():
        p, b = LOGS / f"eval_{fold}.json", CHAIN / f"eval_{fold}.json"
        if not (p.exists() and b.exists()):
            continue
        s, c = json.loads(p.read_text()), json.loads(b.read_text())
        d704.append(s["livecell_704"]["AP"] - c["livecell_704"]["AP"])
        d832.append(s["livecell_832"]["AP"] - c["livecell_832"]["AP"])
        rows.append(f"| {field} | {c['livecell_704']['AP']:.3f} | {s['livecell_704']['AP']:.3f} | "
                    f"{c['livecell_832']['AP']:.3f} | {s['livecell_832']['AP']:.3f} | "
                    f"{s['livecell_832']['found']} ({c['livecell_832']['found']}) of {s['livecell_832']['cells']} | "
                    f"{c['shsy5y_704']['AP']:.3f} / {s['shsy5y_704']['AP']:.3f} |")
    head = ["| held-out field | small's chain, 704 | + big's fields, 704 | chain, 832 | + big's fields, 832 | "
            "found at 832 (chain) | SH-SY5Y held out, 704: chain / student |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    if len(d704) > 1:
        rows.append(f"| paired difference, mean (sd), {len(d704)} folds | | {np.mean(d704):+.3f} "
                    f"({np.std(d704, ddof=1):.3f}) | | {np.mean(d832):+.3f} ({np.std(d832, ddof=1):.3f}) | | |")
    return "\n".join(head + rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("pseudo", "stage1", "eval"):
        sub.add_parser(cmd).add_argument("fold", choices=sorted(sa.ALL_FOLDS))
    sub.add_parser("snapshot")
    sub.add_parser("table")
    a = p.parse_args()
    PROJECT.mkdir(parents=True, exist_ok=True)
    if a.cmd == "pseudo":
        pseudo(a.fold)
    elif a.cmd == "stage1":
        print(stage1(a.fold))
    elif a.cmd == "eval":
        res = sa.score(str(PROJECT / a.fold / "weights" / "last.pt"), a.fold)
        (PROJECT / f"eval_{a.fold}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "weights"}, indent=1))
    elif a.cmd == "snapshot":
        snapshot()
    else:
        print(table())


if __name__ == "__main__":
    main()
