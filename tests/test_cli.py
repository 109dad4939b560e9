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


def _one_clear_line(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode != 0
    err = p.stderr.strip()
    assert "Traceback" not in err, err
    assert err.startswith("error:"), err
    for w in words:
        assert w in err, err


def test_nonexistent_source(tmp_path):
    p = run_cli("segment", str(tmp_path / "missing"), str(tmp_path / "out"))
    _one_clear_line(p, "missing", "does not exist")
    assert not (tmp_path / "out").exists()


def test_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    p = run_cli("segment", str(tmp_path / "empty"), str(tmp_path / "out"))
    _one_clear_line(p, "no images found")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("I am a file")
    p = run_cli("segment", str(EXAMPLES), str(blocker / "out"))
    _one_clear_line(p, "not writable")


def test_unknown_model(tmp_path):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--model", "huge")
    _one_clear_line(p, "unknown model 'huge'")
    assert not (tmp_path / "out").exists()


def test_untrusted_weights_file(tmp_path):
    fake = tmp_path / "mine.pt"
    fake.write_bytes(b"not really a model")
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--model", str(fake))
    _one_clear_line(p, "--trust-weights")


def test_out_inside_source(tmp_path, example_plate):
    p = run_cli("segment", str(example_plate), str(example_plate / "results"))
    _one_clear_line(p, "inside the source")


@pytest.mark.parametrize("opts,msg", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_storage_options(tmp_path, opts, msg):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--storage-options", opts)
    _one_clear_line(p, msg)


def test_bad_pattern(tmp_path):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--pattern", "(unclosed")
    _one_clear_line(p, "--pattern")


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
    _one_clear_line(p, "another model or other parameters", "--overwrite")
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing written
    p = run_cli("segment", str(example_plate), str(out), "--conf", "0.6", "--overwrite", "--num-cpus", "2")
    assert p.returncode == 0, p.stderr


def test_unknown_option_is_one_line(tmp_path):
    p = run_cli("segment", str(EXAMPLES), str(tmp_path / "out"), "--frobnicate")
    _one_clear_line(p, "No such option: --frobnicate")
    assert not (tmp_path / "out").exists()
