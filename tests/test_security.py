"""Weights are verified before unpickling; submitted values never reach a shell."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import pytest

from livecell_ray.model import models
from livecell_ray.pipeline import jobs

from .conftest import EXAMPLES, ROOT


def test_shipped_weights_match_their_checksums():
    sums = models.known_checksums()
    assert "small.pt" in sums
    w = models.resolve("small")
    assert w.sha256 == sums["small.pt"] == models.sha256(ROOT / "weights" / "small.pt")


def test_tampered_shipped_weights_are_refused(tmp_path, monkeypatch):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    shutil.copy(ROOT / "weights" / "SHA256SUMS", wdir / "SHA256SUMS")
    data = bytearray((ROOT / "weights" / "small.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (wdir / "small.pt").write_bytes(bytes(data))
    monkeypatch.setenv("LIVECELL_RAY_WEIGHTS", str(wdir))
    with pytest.raises(models.WeightsError, match="does not match"):
        models.resolve("small")


def test_user_weights_need_trust(tmp_path):
    own = tmp_path / "mine.pt"
    shutil.copy(ROOT / "weights" / "small.pt", own)
    assert models.resolve(str(own)).sha256  # a byte-identical copy of a shipped model is known
    import torch

    other = tmp_path / "other.pt"
    torch.save({"model": None}, other)  # a checkpoint of one's own: unknown checksum
    with pytest.raises(models.WeightsError, match="--trust-weights"):
        models.resolve(str(other))
    assert models.resolve(str(other), trust=True).path == str(other.resolve())
    # A file that cannot be a checkpoint is named by the user's own path, trusted or not.
    for data, why in ((b"", "an empty file"), (b"\x80\x04not a model", "truncated, or another kind of file"),
                      (other.read_bytes()[:200], "truncated")):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(data)
        with pytest.raises(models.WeightsError, match=f"{bad}: not a PyTorch checkpoint .{why}"):
            models.resolve(str(bad), trust=True)


def test_weights_changed_after_the_driver_checked_are_refused_where_loaded(tmp_path):
    """The driver hashes the file; a model actor (maybe on another node, later) loads it: the actor checks
    the bytes it unpickles against the driver's checksum and names its node and the file when they differ."""
    own = tmp_path / "mine.pt"
    shutil.copy(ROOT / "weights" / "small.pt", own)
    checked = models.resolve(str(own))  # the driver's check
    assert models.load(checked).task == "segment"  # unchanged: loads
    data = bytearray(own.read_bytes())
    data[len(data) // 2] ^= 0xFF  # changed between the driver's check and the actor's load
    own.write_bytes(bytes(data))
    with pytest.raises(models.WeightsError) as err:
        models.load(checked)
    msg = str(err.value)
    assert str(own.resolve()) in msg and "host " in msg and "refusing to unpickle" in msg
    own.unlink()
    with pytest.raises(models.WeightsError, match="cannot read the weights"):
        models.load(checked)


@pytest.mark.slow
def test_onnx_cache_is_keyed_and_verified_by_checksum(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime (onnx extra) not installed")
    w = models.resolve("small")
    first = models.onnx_path(w, tmp_path)
    assert first.name == f"{w.sha256}.onnx"
    good = first.read_bytes()
    assert models.onnx_path(w, tmp_path).stat().st_mtime_ns == first.stat().st_mtime_ns  # reused as it is
    first.write_bytes(good[: len(good) // 2])  # a damaged or replaced cache file
    again = models.onnx_path(w, tmp_path)
    assert again.read_bytes() != good[: len(good) // 2] and models.sha256(again) == (
        tmp_path / f"{w.sha256}.onnx.sha256").read_text()


def test_job_entrypoint_is_shell_safe(tmp_path):
    spec = {"source": "/data/plate $(touch /tmp/pwned); rm -rf ~", "output": "out`id`", "model": "small"}
    cmd = jobs.entrypoint(spec, "python")
    prog, script, flag, payload = cmd.split(" ")
    assert (prog, script, flag) == ("python", "jobs/segment_plate.py", "--spec-b64")
    assert re.fullmatch(r"[A-Za-z0-9_=-]+", payload)
    assert json.loads(base64.urlsafe_b64decode(payload)) == spec


@pytest.mark.slow
def test_file_names_with_shell_characters_are_just_names(tmp_path, ray_local):
    from livecell_ray import pipeline, store
    from livecell_ray.config import SegmentConfig

    plate = tmp_path / "plate $(touch pwned) ; x"
    plate.mkdir()
    src = sorted(EXAMPLES.glob("*.tif"))[0]
    shutil.copy(src, plate / src.name)
    out = tmp_path / "out `touch pwned2`"
    summary = pipeline.run(SegmentConfig(source=str(plate), out=str(out)))
    assert summary.fields_done == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    assert not any(p.name.startswith("pwned") for p in tmp_path.rglob("*"))
    assert len(store.Outputs(str(out)).read_table("fields")) == 1


def test_local_ray_has_no_dashboard_and_cluster_dashboard_is_loopback():
    text = (ROOT / "cluster.yaml").read_text()
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text
    src = (ROOT / "livecell_ray" / "pipeline" / "cluster.py").read_text()
    assert "include_dashboard=False" in src


def test_no_shell_anywhere_in_the_package():
    for py in (ROOT / "livecell_ray").rglob("*.py"):
        text = py.read_text()
        assert "shell=True" not in text and "os.system(" not in text, py
    p = subprocess.run([sys.executable, "-c", "import livecell_ray.cli"], capture_output=True, timeout=60)
    assert p.returncode == 0
