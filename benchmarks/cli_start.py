"""How soon the first field comes out of the command a user types: `livecell-ray segment` on the bundled
example plate (10 fields, small.pt, local Ray on this machine's CPUs), against other code side by side.

    python benchmarks/cli_start.py [--baseline REV|FOLDER] [--rounds 3]

Each run is the CLI in a fresh process (`python -m livecell_ray.cli segment`, with the checkout's package
first on the path); from its run.json: the first field's time from `pipeline.run` (which starts Ray),
and the command's wall time from start to exit. With ``--baseline``, that code runs in turns with this
one's and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_cli(code: Path, out: Path) -> dict[str, float]:
    """One `segment` of the example plate with ``code``'s package; its first-field and wall times."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "livecell_ray.cli", "segment", str(ROOT / "examples" / "livecell_plate"),
                    str(out), "--no-compact"], check=True, env=env, capture_output=True, cwd=code)
    wall = time.perf_counter() - t
    last = json.loads((out / "run.json").read_text())["last_run"]
    return {"first_field": float(last["time_to_first_field"]), "wall": wall}


def main() -> None:
    from replay import _checkout, _clean_up

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, help="a checkout's folder, or a git revision (a temporary worktree)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lcr-cli-"))
    try:
        codes = {"this code": ROOT}
        if a.baseline:
            codes = {"baseline": _checkout(a.baseline, tmp / "baseline"), "this code": ROOT}
        res: dict[str, list[dict[str, float]]] = {k: [] for k in codes}
        for r in range(a.rounds):
            for name, code in codes.items():
                res[name].append(run_cli(code, tmp / f"out-{r}-{name.replace(' ', '_')}"))
                x = res[name][-1]
                print(f"  {name:9s} first field {x['first_field']:.2f} s from pipeline.run, command {x['wall']:.2f} s",
                      flush=True)
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("first_field", "wall")} for k, v in res.items()}
        for name, m in med.items():
            print(f"median {name}: first field {m['first_field']:.2f} s, command {m['wall']:.2f} s")
        if a.baseline:
            for m, what in (("first_field", "first field"), ("wall", "command")):
                print(f"this code / baseline, {what}: {med['this code'][m] / med['baseline'][m]:.2f}x")
    finally:
        _clean_up(tmp)


if __name__ == "__main__":
    main()
