"""The CLI's error cases: one clear line, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EXAMPLES

CLI = [sys.executable, "-m", "livecell_ray.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _one_clear_line(p: subprocess.CompletedProcess, out: Path | None, *words: str) -> None:
    """Exit code 2 (the documented one for a refused command), one `error:` line, and no OUT made."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    if out is not None:
        assert not out.exists(), f"{out} was written"
    err = p.stderr.strip()
    assert "Traceback" not in err, err
    assert err.startswith("error:"), err
    for w in words:
        assert w in err, err


def test_nonexistent_source(tmp_path):
    p = run_cli("segment", str(tmp_path / "missing"), str(tmp_path / "out"))
    _one_clear_line(p, tmp_path / "out", "missing", "does not exist")


def test_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    p = run_cli("segment", str(tmp_path / "empty"), str(tmp_path / "out"))
    _one_clear_line(p, tmp_path / "out", "no images found")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("I am a file")
    p = run_cli("segment", str(EXAMPLES), str(blocker / "out"))
    _one_clear_line(p, blocker / "out", "not writable")
    assert blocker.read_text() == "I am a file"


def test_unknown_model(tmp_path):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--model", "huge")
    _one_clear_line(p, tmp_path / "out", "unknown model 'huge'")


def test_untrusted_weights_file(tmp_path):
    fake = tmp_path / "mine.pt"
    fake.write_bytes(b"not really a model")
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--model", str(fake))
    _one_clear_line(p, tmp_path / "out", "--trust-weights")


def test_out_inside_source(tmp_path, example_plate):
    p = run_cli("segment", str(example_plate), str(example_plate / "results"))
    _one_clear_line(p, example_plate / "results", "inside the source")


@pytest.mark.parametrize("opts,msg", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_storage_options(tmp_path, opts, msg):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--storage-options", opts)
    _one_clear_line(p, tmp_path / "out", msg)


def test_bad_pattern(tmp_path):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--pattern", "(unclosed")
    _one_clear_line(p, tmp_path / "out", "--pattern")


def test_version_is_the_package_version():
    import livecell_ray

    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"livecell-ray {livecell_ray.__version__}", p.stdout + p.stderr


def test_help_lists_commands():
    p = run_cli("--help")
    assert p.returncode == 0 and "segment" in p.stdout


@pytest.mark.slow
def test_out_made_with_other_parameters_is_refused(tmp_path, example_plate):
    one = sorted(example_plate.glob("*.tif"))
    for p in one[1:]:
        p.unlink()
    out = tmp_path / "out"
    first = run_cli("segment", str(example_plate), str(out), "--num-cpus", "2")
    assert first.returncode == 0, first.stderr
    before = sorted(str(p) for p in out.rglob("*"))
    p = run_cli("segment", str(example_plate), str(out), "--conf", "0.6", "--num-cpus", "2")
    _one_clear_line(p, None, "another model or other parameters", "--overwrite")
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing written
    p = run_cli("segment", str(example_plate), str(out), "--conf", "0.6", "--overwrite", "--num-cpus", "2")
    assert p.returncode == 0, p.stderr


def test_unknown_option_is_one_line(tmp_path):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--frobnicate")
    _one_clear_line(p, tmp_path / "out", "No such option: --frobnicate")


@pytest.mark.slow
def test_pattern_and_manifest_read_other_namings_end_to_end(tmp_path):
    """An instrument's own names through --pattern, and a CellProfiler-style --manifest, each a full run."""
    import shutil

    import pandas as pd

    src = tmp_path / "plate"
    src.mkdir()
    files = sorted(EXAMPLES.glob("*.tif"))[:2]
    for k, f in enumerate(files):
        shutil.copy(f, src / f"screen7_r02c{k + 3:02d}f01_t{12 * k:03d}h.tif")
    pattern = r"(?P<plate>screen\d+)_r(?P<row>\d+)c(?P<column>\d+)f(?P<field>\d+)_t(?P<timepoint>\d+)h"
    p = run_cli("segment", str(src), str(tmp_path / "by_pattern"), "--pattern", pattern, "--num-cpus", "2")
    assert p.returncode == 0, p.stderr
    fields = pd.read_parquet(tmp_path / "by_pattern" / "fields")
    assert sorted(zip(fields["plate"].astype(str), fields["well"].astype(str), fields["timepoint"])) == [
        ("screen7", "B3", 0.0), ("screen7", "B4", 12.0)]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [str(f) for f in files], "plate": ["lab1", "lab1"], "well": ["C2", "C3"],
                  "field": ["1", "2"], "timepoint": [0.0, 24.0], "cell_type": ["x", "y"]}).to_csv(manifest, index=False)
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "by_manifest"), "--manifest", str(manifest),
                "--num-cpus", "2")
    assert p.returncode == 0, p.stderr
    fields = pd.read_parquet(tmp_path / "by_manifest" / "fields")
    assert sorted(zip(fields["well"].astype(str), fields["cell_type"], fields["timepoint"])) == [
        ("C2", "x", 0.0), ("C3", "y", 24.0)]


@pytest.mark.slow
def test_query_values_are_parameters_and_mistyped_input_is_one_line(tmp_path, example_plate):
    for p in sorted(example_plate.glob("*.tif"))[2:]:
        p.unlink()
    (example_plate / "scan_0001.tif").write_bytes(next(example_plate.glob("*.tif")).read_bytes())  # unmatched
    out = tmp_path / "out"
    seg = run_cli("segment", str(example_plate), str(out), "--num-cpus", "2")
    assert seg.returncode == 0 and "1: scan_0001.tif (each in failures/)" in seg.stdout, seg.stdout
    everything = run_cli("query", str(out), "cells", "--format", "csv")
    one = run_cli("query", str(out), "cells", "--well", "a07", "--format", "csv")  # A7 as A07, a7 or a07
    assert one.returncode == 0 and everything.returncode == 0, one.stderr
    import csv
    import io

    wells = {r["well"] for r in csv.DictReader(io.StringIO(one.stdout))}
    assert wells == {"A7"} and len(one.stdout.splitlines()) < len(everything.stdout.splitlines())
    _one_clear_line(run_cli("query", str(out), "cells", "--well", "A7' OR '1'='1"), None, "--well")
    _one_clear_line(run_cli("sql", str(out), "  "), None, "empty SQL")
    # Empty values print as nothing in a table, never as nan or None.
    import pandas as pd

    cells_csv = pd.read_csv(io.StringIO(everything.stdout))
    assert cells_csv.isna().any().any()  # the run leaves some values empty (no pixel size: no area in um2)
    table = run_cli("query", str(out), "cells", "--limit", "5", "--format", "table").stdout
    assert not {"nan", "None", "NaN", "<NA>"} & set(table.replace("│", " ").split()), table
    # Files to write checked before the work: a missing folder, a folder given as the file.
    _one_clear_line(run_cli("query", str(out), "wells", "--format", "csv", "--output", "/nonexistent/dir/x.csv"),
                    None, "--output", "/nonexistent/dir does not exist")
    _one_clear_line(run_cli("report", str(out), "--html", "/nonexistent/r.html"), None, "--html",
                    "/nonexistent does not exist")
    _one_clear_line(run_cli("report", str(out), "--html", str(tmp_path)), None, "--html", "is a folder")
    folder = tmp_path / "dir.pt"
    folder.mkdir()
    _one_clear_line(run_cli("segment", str(example_plate), str(tmp_path / "o2"), "--model", str(folder)), None,
                    str(folder), "is a folder")
