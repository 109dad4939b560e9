"""The worked examples in docs/, made by running their commands: `python docs/examples.py` runs each and writes
its output into the page between its markers; `python docs/examples.py --check` says (and exits 1) where a
page no longer holds what its commands give. tests/test_docs.py runs the check, so a changed model or
output can never leave a stale figure in the docs.

Each example is a page, a name and a function that runs commands in a scratch folder and returns the
markdown it embeds (between ``<!-- example: NAME -->`` and ``<!-- /example -->``).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SKBR3 = SHARED / "livecell" / "unlabelled"


def _cli(*args: str, cwd: Path) -> str:
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=1800, env={**os.environ, "COLUMNS": "200"})
    if p.returncode:
        raise SystemExit(f"livecell-ray {' '.join(args)} failed: {p.stderr[-2000:]}")
    return p.stdout


def skbr3_growth(tmp: Path) -> str:
    """docs/screens.md: one SkBr3 well imaged every 4 h, its cells per field and its growth fit."""
    (tmp / "skbr3").mkdir()
    for p in sorted(SKBR3.glob("SkBr3_Phase_H3_2_*")):
        shutil.copy(p, tmp / "skbr3")
    _cli("segment", "skbr3", "skbr3_out", "--num-cpus", "2", cwd=tmp)
    wells = pd.read_csv(io.StringIO(_cli("query", "skbr3_out", "wells", "--format", "csv", "--metrics",
                                         "cells_per_field_mean,confluence_pct", cwd=tmp)))
    growth = pd.read_csv(io.StringIO(_cli("query", "skbr3_out", "growth", "--format", "csv", cwd=tmp)))
    g = growth.iloc[0]
    lines = ["| time since first scan (h) | cells per field | confluence (%) |", "| --- | --- | --- |"]
    lines += [f"| {r.timepoint_h:g} | {r.cells_per_field_mean:.0f} | {r.confluence_pct:.1f} |"
              for r in wells.itertuples()]
    lines += ["", "| well | growth rate (/h) | doubling time (h) | R² | window (h) | timepoints used / imaged |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| {g['plate']} {g['well']} | {g['growth_rate_per_h']:.4f} | **{g['doubling_time_h']:.1f}** | "
              f"{g['r2']:.3f} | {g['t_start_h']:g}-{g['t_end_h']:g} | {int(g['n_points'])} / "
              f"{int(g['n_timepoints'])} |"]
    return "\n".join(lines)


#: name -> (page, the function that makes its block, what it needs)
EXAMPLES: dict[str, tuple[str, Callable[[Path], str], Path]] = {
    "skbr3-growth": ("docs/screens.md", skbr3_growth, SKBR3),
}


def block(text: str, name: str) -> tuple[int, int]:
    """Where example ``name``'s output lies in a page's text (start, end), between its markers."""
    start, end = f"<!-- example: {name} -->\n", "<!-- /example -->"
    i = text.index(start) + len(start)
    return i, text.index(end, i)


def run(name: str) -> str:
    with tempfile.TemporaryDirectory(prefix=f"livecell-ray-{name}-") as tmp:
        return EXAMPLES[name][1](Path(tmp)).rstrip("\n") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on a difference")
    ap.add_argument("names", nargs="*", default=sorted(EXAMPLES))
    a = ap.parse_args()
    stale = []
    for name in a.names:
        page, _, needs = EXAMPLES[name]
        if not needs.exists():
            print(f"{name}: skipped, {needs} is absent")
            continue
        path = ROOT / page
        text = path.read_text()
        i, j = block(text, name)
        got = run(name)
        if text[i:j] == got:
            print(f"{name}: {page} is up to date")
        elif a.check:
            stale.append(name)
            print(f"{name}: {page} differs from what its commands give:\n{got}")
        else:
            path.write_text(text[:i] + got + text[j:])
            print(f"{name}: {page} updated")
    sys.exit(1 if stale else 0)


if __name__ == "__main__":
    main()
