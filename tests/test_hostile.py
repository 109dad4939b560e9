"""Hostile inputs: files whose metadata, pixels or pages lie, plates whose names collide, OUTs stopped or emptied.

Each test builds a small plate of real LIVECell fields with the fault, runs the real pipeline (local Ray, the
shipped model) and checks the promise: a bad file lands in failures/ with a one-line reason naming it, every
good field completes in the same run, nothing is garbled, and a rerun is clean.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from livecell_ray import pipeline, store
from livecell_ray.config import SegmentConfig
from livecell_ray.model.replica import isolated
from livecell_ray.plate.imaging import decode, normalize
from tests.conftest import EXAMPLES

GOOD = ["A172_Phase_A7_1_00d00h00m_1.tif", "BT474_Phase_A3_2_01d12h00m_2.tif", "SKOV3_Phase_G4_1_00d12h00m_2.tif"]


def field(name: str = GOOD[0]) -> np.ndarray:
    return tifffile.imread(EXAMPLES / name)


def good_plate(tmp_path, names=GOOD):
    src = tmp_path / "plate"
    src.mkdir()
    for n in names:
        shutil.copy(EXAMPLES / n, src / n)
    return src


def failures(out) -> pd.DataFrame:
    return store.Outputs(str(out)).read_table("failures")


def one_line_naming(error: str, name: str) -> bool:
    return "\n" not in error and name in error


# ---------------------------------------------------------------- a field's failure is its own
def test_a_batch_that_raises_is_run_again_field_by_field():
    """The replica's isolation: only the field that fails alone is marked failed."""
    calls = []

    def run(idx):
        calls.append(list(idx))
        if 2 in idx:
            raise RuntimeError("CUDA out of memory\nsecond line of a long trace")
        return [i * 10 for i in idx]

    errors = [""] * 4
    out = isolated(run, [0, 1, 2, 3], ["a", "b", "c", "d"], errors, "model")
    assert out == {0: 0, 1: 10, 3: 30}
    assert errors == ["", "", "c: model failed (RuntimeError: CUDA out of memory)", ""]
    assert calls[0] == [0, 1, 2, 3] and len(calls) == 5


@pytest.mark.slow
def test_metadata_scales_beyond_reason_fail_their_field_alone_and_reruns_complete(tmp_path, ray_local):
    src = good_plate(tmp_path)
    g = field("A172_Phase_A7_1_00d00h00m_1.tif")
    # an OME-TIFF claiming 1240 um/px (a 33 TB resample), one at 50 um/px, a resolution tag of 1 px/cm
    tifffile.imwrite(src / "A172_Phase_B1_1_00d00h00m_1.ome.tif", g, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 1240.0, "PhysicalSizeY": 1240.0})
    tifffile.imwrite(src / "A172_Phase_B2_1_00d00h00m_1.ome.tif", g, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 50.0, "PhysicalSizeY": 50.0})
    tifffile.imwrite(src / "A172_Phase_B3_1_00d00h00m_1.tif", g, resolution=(1, 1), resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    cfg = SegmentConfig(source=str(src), out=str(out), batch_size=8)  # one model batch holds all six
    s = pipeline.run(cfg)
    assert (s.fields_done, s.fields_failed) == (3, 3)
    f = failures(out)
    assert len(f) == 3 and set(f["stage"]) == {"segment"}
    for name, claim in (("B1_1", "1240 um/px"), ("B2_1", "50 um/px"), ("B3_1", "10000 um/px")):
        err = f.loc[f["path"].str.contains(name), "error"].item()
        assert one_line_naming(err, name) and claim in err and "--pixel-size" in err, err
    done = store.Outputs(str(out)).read_table("fields")
    assert sorted(done["path"].map(os.path.basename)) == sorted(GOOD)
    again = pipeline.run(cfg)  # the good ones are done, the bad ones fail again at once: never a stall
    assert (again.fields_skipped, again.fields_done, again.fields_failed) == (3, 0, 3) and not again.restarts
    assert len(failures(out)) == 3
    # The user's word overrides the metadata: all six segment.
    fixed = pipeline.run(SegmentConfig(source=str(src), out=str(tmp_path / "out2"), batch_size=8, pixel_size=1.24))
    assert (fixed.fields_done, fixed.fields_failed) == (6, 0)


# ---------------------------------------------------------------- inputs read as what they are
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def test_a_nan_pixel_is_left_out_of_the_normalisation_not_a_blank_field():
    g = field().astype(np.float32)
    f = g.copy()
    f[10, 10], f[20, 20], f[30, 30] = np.nan, np.inf, -np.inf
    n, ref = normalize(f), normalize(g)
    assert n.max() == 255 and (n == ref).mean() > 0.999
    with pytest.raises(ValueError, match="no finite pixel"):
        b = io.BytesIO()
        tifffile.imwrite(b, np.full((64, 64), np.nan, np.float32))
        decode(b.getvalue(), "allnan.tif")


@pytest.mark.parametrize("kind", ["palette png", "palette tiff", "cmyk jpeg", "la png"])
def test_palette_cmyk_and_alpha_images_are_decoded_to_their_picture(kind):
    g = field()
    if kind == "palette png":
        data = _encode(Image.fromarray(g).convert("P"), "PNG")
    elif kind == "cmyk jpeg":
        data = _encode(Image.fromarray(g).convert("CMYK"), "JPEG", quality=95)
    elif kind == "la png":
        data = _encode(Image.fromarray(g).convert("LA"), "PNG")
    else:  # a palette whose index order is the reverse of the intensities it shows
        idx = (255 - g).astype(np.uint8)
        cmap = np.repeat((np.arange(256)[::-1] * 257).astype(np.uint16)[None], 3, axis=0)
        b = io.BytesIO()
        tifffile.imwrite(b, idx, photometric="palette", colormap=cmap)
        data = b.getvalue()
    out = decode(data, f"x.{kind}")
    r = np.corrcoef(out.ravel().astype(float), g.ravel().astype(float))[0, 1]
    assert out.shape == g.shape and r > 0.98, r


def test_a_thumbnail_page_or_unequal_pages_are_refused_not_guessed():
    g = field()
    for first, second in ((g[:64, :64], g), (g, g[:400, :600])):
        b = io.BytesIO()
        with tifffile.TiffWriter(b) as w:
            w.write(first)
            w.write(second)
        with pytest.raises(ValueError, match="images of different sizes") as e:
            decode(b.getvalue(), "multi.tif")
        assert "multi.tif" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_symlinked_folders_are_followed_once_and_a_loop_does_not_hang(tmp_path, ray_local):
    root = tmp_path / "plate"
    real = tmp_path / "elsewhere"
    real.mkdir()
    shutil.copy(EXAMPLES / GOOD[1], real / GOOD[1])
    (root / "a").mkdir(parents=True)
    shutil.copy(EXAMPLES / GOOD[0], root / "a" / GOOD[0])
    os.symlink(real, root / "linked")
    os.symlink(root, root / "a" / "loop")  # back up the tree
    from livecell_ray.plate import manifest

    man = manifest.scan(str(root))
    assert sorted(os.path.basename(p) for p in man.fields["path"]) == sorted(GOOD[:2])


# ---------------------------------------------------------------- one plate, one shape per field; names
@pytest.mark.slow
def test_two_timepoints_of_one_field_at_different_sizes_in_one_run(tmp_path, ray_local):
    src = tmp_path / "plate"
    src.mkdir()
    g = field()
    tifffile.imwrite(src / "A172_Phase_A7_1_00d00h00m_1.tif", g)
    tifffile.imwrite(src / "A172_Phase_A7_1_00d04h00m_1.tif", g[:400, :600])
    out = tmp_path / "out"
    s = pipeline.run(SegmentConfig(source=str(src), out=str(out), batch_size=1))
    assert (s.fields_done, s.fields_failed) == (1, 1)
    f = failures(out)
    err = f["error"].item()
    assert "\n" not in err and "600x400" in err and "704x520" in err and "one size" in err, err
    o = store.Outputs(str(out))
    kept = o.read_table("fields")
    assert len(kept) == 1
    r = kept.iloc[0]
    labels = store.read_labels(o, r.plate, r.zarr_path.split(".zarr/", 1)[1], int(r.t_index))
    assert labels.shape == (r.height, r.width) and labels.max() == r.n_cells
    again = pipeline.run(SegmentConfig(source=str(src), out=str(out), batch_size=1))  # across runs: refused too
    assert (again.fields_done, again.fields_failed) == (0, 1)


def test_plate_names_that_differ_only_in_sanitised_characters_are_refused_before_anything(tmp_path):
    rows = [{"path": str(EXAMPLES / n), "plate": p, "well": "A1", "field": "1", "timepoint": 0}
            for n, p in zip(GOOD, ("Plate 1", "Plate-1", "Plate/1"))]
    csv = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="would all be stored as 'Plate-1'") as e:
        pipeline.run(SegmentConfig(source=str(EXAMPLES), out=str(out), manifest=str(csv)))
    assert "\n" not in str(e.value) and str(csv) in str(e.value)
    assert not out.exists() or not any(out.rglob("*.parquet"))


# ---------------------------------------------------------------- provenance from the first commit
@pytest.mark.slow
def test_provenance_is_written_before_the_first_field_and_guards_an_interrupted_out(tmp_path, ray_local):
    src = good_plate(tmp_path)
    out = tmp_path / "out"
    seen = []

    def on_field(res, done, total):
        if done == 1:
            seen.append(store.Outputs(str(out)).read_run())

    cfg = SegmentConfig(source=str(src), out=str(out), batch_size=1)
    pipeline.run(cfg, progress=on_field)
    assert seen and seen[0]["provenance"]["models"] and "last_run" not in seen[0]
    # An OUT whose run.json says nothing (emptied, or left by a run stopped before it was written): the
    # committed fields' own metadata guards it.
    for text in ("{}", '{"provenance": {"mod'):  # empty, then truncated
        (out / "run.json").write_text(text)
        with pytest.raises(pipeline.RunError, match="another model or other parameters"):
            pipeline.run(SegmentConfig(source=str(src), out=str(out), batch_size=1, model="big"))
        s = pipeline.run(cfg)  # the same parameters resume, and rewrite run.json whole
        assert s.fields_skipped == 3 and json.loads((out / "run.json").read_text())["provenance"]["models"]


# ---------------------------------------------------------------- outputs that check themselves
def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "livecell_ray.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_verify_names_each_damaged_file_and_repair_lets_a_rerun_redo_them(tmp_path, ray_local):
    src = good_plate(tmp_path)
    shutil.copy(EXAMPLES / GOOD[0], src / "A172_Phase_A7_2_00d00h00m_1.tif")  # a second field in well A7
    out = tmp_path / "out"
    cfg = SegmentConfig(source=str(src), out=str(out), batch_size=4, compact=False)
    pipeline.run(cfg)
    p = _cli("verify", str(out))
    assert p.returncode == 0 and "4 fields" in p.stdout and "no damage" in p.stdout, p.stdout + p.stderr
    o = store.Outputs(str(out))
    rows = o.read_table("fields").sort_values("path").reset_index(drop=True)
    a, b, c = (rows.iloc[i] for i in range(3))
    cells_a = o.table_path("cells", a.plate, a.well, a.field_id)
    with open(cells_a, "r+b") as f:  # truncated
        f.truncate(os.path.getsize(cells_a) // 2)
    chunk_b = out / b.zarr_path / "labels/cells/0/c" / str(b.t_index) / "0" / "0"
    chunk_b.unlink()  # would read back as zeros
    chunk_c = out / c.zarr_path / "labels/cells/0/c" / str(c.t_index) / "0" / "0"
    data = bytearray(chunk_c.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(16)  # flipped bytes
    chunk_c.write_bytes(bytes(data))
    p = _cli("verify", str(out))
    damaged = [ln for ln in p.stderr.splitlines() if "damaged:" in ln]
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(damaged) == 3, p.stderr
    assert any(cells_a in ln and "unreadable Parquet" in ln for ln in damaged)
    assert any(str(chunk_b.parent.parent) in ln and "chunk missing" in ln and f"{b.n_cells} cells" in ln
               for ln in damaged)
    assert any(str(chunk_c.parent.parent) in ln for ln in damaged)
    p = _cli("verify", str(out), "--repair")
    assert p.returncode == 0 and p.stderr.count("un-committed:") == 6, p.stderr
    s = pipeline.run(cfg)
    assert (s.fields_skipped, s.fields_done, s.fields_failed) == (1, 3, 0)
    assert _cli("verify", str(out)).returncode == 0
    # A truncated compacted part: the rerun redoes the well's fields (no traceback), verify names the part.
    from livecell_ray.store import compact

    compact.compact(str(out))
    part = next(p for p in o.committed().fields if "/part-" in p)
    with open(part, "r+b") as f:
        f.truncate(100)
    s = pipeline.run(cfg)
    assert (s.fields_done, s.fields_failed) == (2, 0)  # the two fields of well A7
    p = _cli("verify", str(out))
    assert p.returncode == 1 and part in p.stderr and "unreadable Parquet" in p.stderr
    assert _cli("verify", str(out), "--repair").returncode == 0 and _cli("verify", str(out)).returncode == 0
    assert len(store.Outputs(str(out)).read_table("fields")) == 4


# ---------------------------------------------------------------- a full disk, a read-only OUT, Ray's processes dying
@pytest.fixture()
def small_disk(tmp_path):
    """A real filesystem of 1.2 MB (a tmpfs): room for two fields' outputs, not three."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if p.returncode:
        pytest.skip(f"a real full disk needs mount(8) of a tmpfs (root): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt, opts: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_leaves_no_temporary_files_and_the_rerun_completes(
        tmp_path, small_disk, ray_local):
    src = good_plate(tmp_path, GOOD + ["BV2_Phase_B4_2_02d16h00m_3.tif", "MCF7_Phase_E4_1_02d16h00m_1.tif"])
    out = small_disk / "out"
    p = _cli("segment", str(src), str(out), "--batch-size", "1")
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert "No space left on device, ENOSPC" in errors[0] and str(out) in errors[0]
    assert not list(out.rglob("*.tmp"))  # the failed write removed its temporary file
    done = len(store.Outputs(str(out)).done_field_ids())
    assert 0 < done < 5
    (out / "masks" / "left-by-a-killed-writer.tmp").write_bytes(b"x")
    _remount(small_disk, "size=64m")
    s = pipeline.run(SegmentConfig(source=str(src), out=str(out), batch_size=1))
    assert (s.fields_skipped, s.fields_done, s.fields_failed) == (done, 5 - done, 0)
    assert not list(out.rglob("*.tmp")) and len(store.Outputs(str(out)).read_table("fields")) == 5


@pytest.mark.slow
def test_an_out_made_read_only_mid_run_stops_with_one_line_and_resumes(tmp_path, small_disk):
    import subprocess
    import sys
    import time

    _remount(small_disk, "size=64m")
    src = good_plate(tmp_path, GOOD + ["BV2_Phase_B4_2_02d16h00m_3.tif", "MCF7_Phase_E4_1_02d16h00m_1.tif"])
    out = small_disk / "out"
    p = subprocess.Popen([sys.executable, "-m", "livecell_ray.cli", "segment", str(src), str(out), "--batch-size",
                          "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((out / "fields").rglob("*.parquet")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    _remount(small_disk, "ro")
    _, stderr = p.communicate(timeout=240)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in stderr and len(errors) == 1, stderr
    assert "Read-only file system, EROFS" in errors[0] and str(out) in errors[0], errors
    _remount(small_disk, "rw")
    # The stopped run could not release OUT's lease on a read-only disk; the rerun takes it over, since the
    # process holding it is gone.
    p = _cli("segment", str(src), str(out), "--batch-size", "1")
    assert p.returncode == 0, p.stderr
    skipped = int(next(ln for ln in p.stdout.splitlines() if "already done" in ln).split("│")[2])
    assert skipped >= 1 and len(store.Outputs(str(out)).read_table("fields")) == 5
    assert not list(out.rglob("*.tmp"))


def _ray_processes(pids: set[int] | None = None) -> set[int]:
    """Live (not zombie) processes of Ray, or of those given."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and (proc.pid in (pids or ()) or (
                pids is None and ("ray::" in cmd or "ray/core/src" in cmd))):
            found.add(proc.pid)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["raylet", "gcs_server"])
def test_rays_own_processes_killed_mid_run_give_one_error_line_and_leave_no_ray_behind(tmp_path, victim, ray_local):
    """`segment` starts its own local Ray; its raylet or GCS SIGKILLed after the first commit: the run stops with
    one `error:` line (or, the GCS gone, finishes the plate) and leaves none of that Ray's processes running."""
    import subprocess
    import sys
    import time

    import psutil

    src = good_plate(tmp_path, GOOD + ["BV2_Phase_B4_2_02d16h00m_3.tif", "MCF7_Phase_E4_1_02d16h00m_1.tif"])
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "livecell_ray.cli", "segment", str(src), str(out), "--batch-size",
                          "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ray_pids: set[int] = set()
    deadline = time.monotonic() + 240
    while not list((out / "fields").rglob("*.parquet")) and time.monotonic() < deadline and p.poll() is None:
        ray_pids |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)}
        time.sleep(0.2)
    kids = psutil.Process(p.pid).children(recursive=True)
    ray_pids |= {c.pid for c in kids}
    target = [c for c in kids if (c.cmdline() or [""])[0].endswith("/" + victim)]  # the binary, not an agent's flag
    assert target, f"no {victim} under the run's process"
    target[0].kill()
    stdout, stderr = p.communicate(timeout=180)
    assert "Traceback" not in stderr and "(raylet)" not in stdout + stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    if p.returncode:
        assert p.returncode == 2 and len(errors) == 1 and "Ray's own processes" in errors[0], stderr
    else:
        assert victim == "gcs_server" and "segmented now" in stdout
    time.sleep(2)
    assert not _ray_processes(ray_pids), "Ray processes outlived the run"
    s = pipeline.run(SegmentConfig(source=str(src), out=str(out), batch_size=1))
    assert s.fields_skipped + s.fields_done == 5 and s.fields_failed == 0


@pytest.mark.slow
def test_a_rerun_redoes_fields_whose_files_are_not_whole_and_queries_name_a_damaged_file(tmp_path, ray_local):
    src = good_plate(tmp_path)
    out = tmp_path / "out"
    cfg = SegmentConfig(source=str(src), out=str(out), batch_size=4, compact=False)
    pipeline.run(cfg)
    o = store.Outputs(str(out))
    a, b = o.read_table("fields").sort_values("path").iloc[:2].itertuples()
    cells_a = o.table_path("cells", a.plate, a.well, a.field_id)
    with open(cells_a, "r+b") as f:  # truncated: breaks every query over cells
        f.truncate(os.path.getsize(cells_a) // 2)
    for args in (["query", str(out), "cells"], ["query", str(out), "wells"], ["sql", str(out), "SELECT 1"],
                 ["report", str(out), "--html", str(tmp_path / "r.html")]):
        p = _cli(*args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1 and cells_a in p.stderr and "verify" in p.stderr, p.stderr
    open(o.table_path("fields", b.plate, b.well, b.field_id), "wb").close()  # emptied
    s = pipeline.run(cfg)  # neither is skipped: both redone, the third kept
    assert (s.fields_skipped, s.fields_done, s.fields_failed) == (1, 2, 0) and len(s.damaged) == 2
    assert any(cells_a in d for d in s.damaged)
    assert len(o.read_table("fields")) == 3 and _cli("verify", str(out)).returncode == 0
    assert _cli("query", str(out), "cells").returncode == 0
