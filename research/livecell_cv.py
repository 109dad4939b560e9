"""Which LIVECell training variant generalises: every fold run scored on the annotated field it never saw.
Figure: research/README.md's LIVECell fold table (mask AP per held-out field and variant, mean and spread).

    python research/livecell_cv.py runs/ablation [--usiigaci ../shared/data/usiigaci/train] [--out DIR]

Each run folder is ``<held-out field>_<variant>`` (as research/livecell_ablation.sh names them); its
``last.pt`` (never the epoch that scored best on the held-out field) is scored with the LIVECell
protocol on that field, and on Usiigaci sets 41-45 as one more set (not a selector). Prints one row a
run, then each variant's mean and spread over folds; with --out, one JSON a run. research/README.md's
"LIVECell cross-validation" table is this script's output.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from livecell_ray.config import InferenceConfig
from livecell_ray.training import evaluate as ev

LC = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "livecell" / "annotated"
USIIGACI_HELD_OUT = ["set41", "set42", "set43", "set44", "set45"]


def score(weights: str, fold: str, usiigaci: str | None) -> dict:
    """Mask AP and friends on the held-out LIVECell field (and on Usiigaci 41-45 when given)."""
    lc, _ = ev.run(weights, str(LC / "livecell_coco_val.json"), str(LC / "images"), InferenceConfig(), True, [fold])
    row = {"fold": fold, "weights": weights, "livecell": ev.to_json(lc)["results"]["all"]}
    if usiigaci:
        us, _ = ev.run(weights, usiigaci, None, InferenceConfig(), True, USIIGACI_HELD_OUT)
        row["usiigaci_41_45"] = ev.to_json(us)["results"]["all"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="folder of <fold>_<variant> run folders")
    ap.add_argument("--usiigaci", default=None, help="Usiigaci train folder, to score sets 41-45 too")
    ap.add_argument("--out", default=None, help="write one JSON a run here")
    ap.add_argument("--weights", default="last.pt", help="which checkpoint of each run (default last.pt)")
    a = ap.parse_args()
    rows = []
    for run in sorted(p for p in Path(a.runs).iterdir() if (p / "weights" / a.weights).exists()):
        fold, variant = run.name.rsplit("_", 1)
        row = {"run": run.name, "variant": variant, **score(str(run / "weights" / a.weights), fold, a.usiigaci)}
        rows.append(row)
        m = row["livecell"]
        us = row.get("usiigaci_41_45", {}).get("mask", {}).get("AP", float("nan"))
        print(f"{run.name:<45} mask AP {m['mask']['AP']:.3f}  AP50 {m['mask']['AP50']:.3f}  "
              f"AP75 {m['mask']['AP75']:.3f}  F1 {m['f1_50']:.3f}  count err {m['count_error']:+.3f}  "
              f"cells {m['n_pred']}/{m['n_gt']}  usiigaci 41-45 {us:.3f}", flush=True)
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / f"{run.name}.json").write_text(json.dumps(row, indent=2))
    for variant in sorted({r["variant"] for r in rows}):
        aps = [r["livecell"]["mask"]["AP"] for r in rows if r["variant"] == variant]
        sd = statistics.stdev(aps) if len(aps) > 1 else float("nan")
        print(f"{variant:<12} {len(aps)} folds: mask AP mean {statistics.mean(aps):.3f}, sd {sd:.3f}, "
              f"range {min(aps):.3f}-{max(aps):.3f}")


if __name__ == "__main__":
    main()
