"""Your own cells (issue 35): a run's fields out for correcting as napari opens them, and corrections (or the Cell
Tracking Challenge's layout) back in as training data at the model's scale."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from livecell_ray import open_results, pipeline
from livecell_ray.config import InferenceConfig, SegmentConfig
from livecell_ray.training import curate, dataset

from .conftest import EXAMPLES, ROOT, SHARED, needs_shared

HELA = SHARED / "ctc_hela_dic"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livecell_ray.cli", *args], capture_output=True, text=True,
                          timeout=900)


def test_picks_are_least_confident_first_spread_over_wells_and_time():
    fields = pd.DataFrame({
        "field_id": [f"f{i}" for i in range(7)], "plate": ["P"] * 7,
        "well": ["A1", "A1", "A1", "B2", "B2", "C3", "C3"],
        "timepoint_h": [0.0, 0.0, 4.0, 0.0, 4.0, 0.0, 0.0],
        "mean_confidence": [0.30, 0.31, 0.50, 0.40, 0.45, np.nan, 0.9],
    })
    got = curate.pick(fields, 5)
    # C3's empty field (nothing found: least confident), then A1's and B2's least confident; in the second
    # round each well's least confident field at a timepoint not yet picked there (A1 at 4 h, not at 0 h).
    assert list(got["field_id"]) == ["f5", "f0", "f3", "f6", "f2"]
    assert len(curate.pick(fields, 50)) == 7 and curate.pick(fields, 0).empty


@pytest.mark.slow
def test_curated_fields_read_back_equal_and_corrections_train(tmp_path, ray_local):
    """curate writes each field as image.tif (the instrument's plane) + labels.tif equal to the run's Zarr
    arrays, read with the files' plain readers as napari's builtin reader does; a correction saved over
    labels.tif is what train --data reads back."""
    src = tmp_path / "plate"
    src.mkdir()
    for p in sorted(EXAMPLES.glob("*.tif"))[:4]:
        tifffile.imwrite(src / p.name, tifffile.imread(p)[:256, :256], resolution=(1 / 1.24, 1 / 1.24),
                         imagej=True, metadata={"unit": "um"})
    out = tmp_path / "out"
    pipeline.run(SegmentConfig(source=str(src), out=str(out), inference=InferenceConfig(imgsz=256)))
    p = _cli("curate", str(out), str(tmp_path / "fix"), "--fields", "3")
    assert p.returncode == 0, p.stderr
    record = json.loads((tmp_path / "fix" / "curate.json").read_text())["fields"]
    assert len(record) == 3 and len({(r["plate"], r["well"]) for r in record}) == 3
    assert [r["mean_confidence"] for r in record] == sorted(r["mean_confidence"] for r in record)
    assert all(r["pixel_size_um"] == pytest.approx(1.24) for r in record)
    res = open_results(str(out))
    for r in record:
        f = res.df(f"SELECT zarr_path, t_index FROM fields WHERE field_id = '{r['field_id']}'").iloc[0]
        group = zarr.open_group(str(out / f["zarr_path"]), mode="r")
        image = tifffile.imread(tmp_path / "fix" / r["folder"] / "image.tif")
        labels = tifffile.imread(tmp_path / "fix" / r["folder"] / "labels.tif")
        np.testing.assert_array_equal(image, group["0"][int(f["t_index"])])
        np.testing.assert_array_equal(image, tifffile.imread(r["source"]))
        np.testing.assert_array_equal(labels, group["labels/cells/0"][int(f["t_index"])])
        assert labels.max() == r["n_cells"] > 0
    # A correction: one cell erased, one painted, saved over labels.tif as napari's labels layer saves it.
    first = tmp_path / "fix" / record[0]["folder"] / "labels.tif"
    fixed = tifffile.imread(first).astype(np.uint32)
    fixed[fixed == 1] = 0
    fixed[:12, :12] = fixed.max() + 1
    tifffile.imwrite(first, fixed)
    back = {f.name: f for f in dataset.read_labelled(tmp_path / "fix")}
    assert sorted(back) == sorted(r["folder"] for r in record)
    np.testing.assert_array_equal(back[record[0]["folder"]].labels, fixed)
    # train --data takes the folder at the scale curate recorded (LIVECell's here: no resize), from small.pt.
    t = _cli("train", "--data", str(tmp_path / "fix"), "--model", str(ROOT / "weights" / "small.pt"), "--epochs",
             "1", "--imgsz", "128", "--batch", "2", "--workers", "0", "--device", "cpu", "--project",
             str(tmp_path / "runs"), "--name", "fix", "--lr0", "0.0005")
    assert t.returncode == 0, t.stderr[-3000:]
    assert "resized by 1 " in t.stderr and (tmp_path / "runs" / "fix" / "weights" / "last.pt").exists()


def _ctc(root, frames=3, shape=(96, 96)):
    """A small Cell Tracking Challenge layout: sequence 01 with gold truth for frame 1, silver for all."""
    rng = np.random.default_rng(0)
    for kind in ("01", "01_GT/SEG", "01_ST/SEG"):
        (root / kind).mkdir(parents=True)
    truth = {}
    for t in range(frames):
        img = rng.integers(0, 255, shape, dtype=np.uint8)
        lab = np.zeros(shape, np.uint16)
        lab[10 + t:30 + t, 10:30], lab[50:70, 40 + t:70] = 1, 2
        tifffile.imwrite(root / "01" / f"t{t:03d}.tif", img)
        tifffile.imwrite(root / "01_ST" / "SEG" / f"man_seg{t:03d}.tif", lab)
        truth[t] = lab
    gold = truth[1].copy()
    gold[gold == 2] = 0
    tifffile.imwrite(root / "01_GT" / "SEG" / "man_seg001.tif", gold)
    tifffile.imwrite(root / "01" / "t009.tif", np.zeros(shape, np.uint8))  # a frame nobody labelled
    return truth, gold


def test_the_cell_tracking_challenge_layout_reads_gold_over_silver(tmp_path):
    truth, gold = _ctc(tmp_path)
    fields = {f.name: f for f in dataset.read_labelled(tmp_path)}
    assert sorted(fields) == ["01_t000", "01_t001", "01_t002"]  # t009 has no labels: left out
    np.testing.assert_array_equal(fields["01_t000"].labels, truth[0])
    np.testing.assert_array_equal(fields["01_t001"].labels, gold)
    assert fields["01_t002"].image.dtype == np.uint8


def test_train_takes_the_ctc_layout_at_its_pixel_size(tmp_path):
    from livecell_ray.cli.training import training_scale
    from livecell_ray.training.train import DataConfig, prepare_dataset

    _ctc(tmp_path / "ctc", shape=(248, 248))
    scale = training_scale(str(tmp_path / "ctc"), str(ROOT / "weights" / "small.pt"), 0.62)
    assert scale == pytest.approx(0.5)  # 0.62 um/px to small.pt's 1.24
    yaml = prepare_dataset(DataConfig(data=str(tmp_path / "ctc"), out=str(tmp_path / "d"), scale=scale))
    assert yaml.exists()
    images = sorted((tmp_path / "d" / "images" / "train").iterdir())
    assert len(images) == 3
    from PIL import Image

    assert Image.open(images[0]).size == (124, 124)


def test_fine_tune_is_the_gentle_recipe_and_needs_trained_weights(tmp_path):
    """`train --fine-tune`: the overrides and learning rate the HeLa curve measured reach ultralytics; from a
    YAML (random weights) there is nothing to fine-tune, and the CLI says so before any work."""
    from livecell_ray.training.train import FINE_TUNE, FINE_TUNE_LR0, TrainConfig, train_args

    args = train_args(TrainConfig(data="d.yaml", model="weights/small.pt", lr0=FINE_TUNE_LR0,
                                  overrides=dict(FINE_TUNE)))
    assert args["freeze"] == 10 and args["mosaic"] == 0.0 and args["copy_paste"] == 0.0
    assert args["lr0"] == FINE_TUNE_LR0 and args["optimizer"] == "AdamW" and args["degrees"] == 180.0
    _ctc(tmp_path / "ctc", shape=(64, 64))
    res = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "train", "--data", str(tmp_path / "ctc"),
                          "--model", "yolov8n-seg.yaml", "--fine-tune"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "--fine-tune continues trained weights" in res.stderr


def _small_field() -> tuple[np.ndarray, object]:
    from livecell_ray.model import models
    from livecell_ray.plate.imaging import normalize

    return normalize(tifffile.imread(EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif")[:320, :320]), models.resolve("small")


def test_a_models_own_confidence_threshold_applies_unless_the_run_sets_one():
    """A user model's `models add --conf` is its threshold where the run gives no --conf; an explicit one wins."""
    import dataclasses

    from livecell_ray.model.segment import Segmenter

    img, w = _small_field()
    own = dataclasses.replace(w, conf=0.6)
    by_model = Segmenter({"*": own}, InferenceConfig(imgsz=320, half=False))([img])[0]
    by_run = Segmenter({"*": w}, InferenceConfig(imgsz=320, conf=0.6, half=False))([img])[0]
    default = Segmenter({"*": own}, InferenceConfig(imgsz=320, conf=0.25, half=False))([img])[0]
    assert len(by_model.confidences) > 0 and (by_model.confidences >= 0.6).all()
    np.testing.assert_array_equal(by_model.labels, by_run.labels)
    assert len(default.confidences) > len(by_model.confidences) and default.confidences.min() < 0.6


def test_the_count_threshold_is_where_the_count_matches_the_truth(tmp_path):
    """count_threshold picks the grid's lowest confidence at which the model's count equals the fields' own: here
    the truth is the model's own cells above 0.5, so the count matches from the first grid step above the
    strongest cell below 0.5 up to 0.5, and is off at the default 0.25."""
    from livecell_ray.model.segment import Segmenter
    from livecell_ray.training import evaluate

    img, w = _small_field()
    seg = Segmenter({"*": w}, InferenceConfig(imgsz=320, conf=0.1, half=False))
    tifffile.imwrite(tmp_path / "f.tif", tifffile.imread(EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif")[:320, :320])
    r = seg([img])[0]
    keep = np.flatnonzero(r.confidences >= 0.5) + 1
    assert 0 < len(keep) < len(r.confidences)
    truth = np.where(np.isin(r.labels, keep), r.labels, 0)
    best, err, err0 = evaluate.count_threshold(seg, [evaluate.EvalImage("f", str(tmp_path / "f.tif"), truth)])
    below = r.confidences[r.confidences < 0.5].max()
    assert err == 0.0 and below < best <= 0.5 and err0 > 0
    assert best == min(c for c in evaluate.COUNT_CONF_GRID if c > below)


@needs_shared(HELA)
def test_the_hela_dic_sequences_read_in_their_own_layout():
    fields = dataset.read_labelled(HELA)
    by_seq = pd.Series([f.name.split("_")[0] for f in fields]).value_counts()
    assert by_seq["01"] == 21 and by_seq["02"] == 42
    assert all(f.labels.max() > 0 and f.image.shape == (512, 512) for f in fields)


@pytest.mark.slow
def test_a_registered_model_serves_its_cell_type_under_model_auto(tmp_path, ray_local, monkeypatch):
    """models add writes the user's models file (checksummed); segment --model auto then sends that cell type's
    fields to it, --model NAME uses it for all; a file changed since it was added is refused; list shows both."""
    monkeypatch.setenv("LIVECELL_RAY_MODELS", str(tmp_path / "cfg" / "models.json"))
    mine = tmp_path / "mine.pt"
    mine.write_bytes((ROOT / "weights" / "bt474.pt").read_bytes())  # a model of one's own: not small.pt
    p = _cli("models", "add", "a172net", str(mine), "--cell-type", "A172", "--pixel-size", "1.24", "--data",
             "two A172 fields", "--figures", "mask AP 0.3")
    assert p.returncode == 0, p.stderr
    record = json.loads((tmp_path / "cfg" / "models.json").read_text())["models"]["a172net"]
    assert record["sha256"] == __import__("hashlib").sha256(mine.read_bytes()).hexdigest()
    listed = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "models", "list"], capture_output=True,
                            text=True, env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    assert "a172net" in listed and "user" in listed and "two A172 fields" in listed and "small" in listed
    src = tmp_path / "plate"
    src.mkdir()
    for name in ("A172_Phase_A7_1_00d00h00m_1.tif", "SkBr3_Phase_E3_2_02d08h00m_1.tif"):
        tifffile.imwrite(src / name, tifffile.imread(EXAMPLES / name)[:256, :256])
    for spec, want in (("auto", {"*": "small.pt", "A172": "mine.pt"}), ("a172net", {"*": "mine.pt"})):
        out = tmp_path / f"out-{spec}"
        seg = _cli("segment", str(src), str(out), "--model", spec, "--imgsz", "256", "--num-cpus", "2")
        assert seg.returncode == 0, seg.stderr[-2000:]
        used = json.loads((out / "run.json").read_text())["provenance"]["models"]
        assert {k: v["path"].rsplit("/", 1)[-1] for k, v in used.items() if k in want} == want
        if spec == "auto":
            assert used["A172"]["sha256"] == record["sha256"]
    mine.write_bytes(mine.read_bytes() + b"\0")
    changed = _cli("segment", str(src), str(tmp_path / "o3"), "--model", "a172net")
    assert changed.returncode != 0 and "has changed since it was added" in changed.stderr
    assert _cli("models", "remove", "a172net").returncode == 0
    assert "a172net" not in json.loads((tmp_path / "cfg" / "models.json").read_text())["models"]


@needs_shared(HELA)
def test_evaluate_scores_a_ctc_sequence_as_it_is_laid_out():
    from livecell_ray.config import InferenceConfig
    from livecell_ray.training import evaluate

    res, info = evaluate.run("small", str(HELA), inference=InferenceConfig(imgsz=320), select=["02_t000"],
                             pixel_size=0.19)
    truth = dataset.read_label_image(HELA / "02_ST" / "SEG" / "man_seg000.tif")
    assert info["images"] == ["02_t000"] and res["all"].n_gt == len(np.unique(truth)) - 1  # labels have gaps
    assert res["all"].mask["AP50"] > 0.2  # the cells are found at the right scale


def test_fields_smaller_than_the_input_are_padded_not_enlarged():
    """ultralytics resizes each training image to its input; a field under it is padded instead (no cells in the
    border), so that its cells are learnt at the size segment sees them (a field of known scale is never
    enlarged there)."""
    f = dataset.LabelledField("f", np.full((78, 60), 100, np.uint8), np.ones((78, 60), np.int32))
    p = dataset.pad_field(f, 96)
    assert p.image.shape == (96, 60) and p.labels.shape == (96, 60)
    assert (p.image[78:] == 100).all() and not p.labels[78:].any() and (p.labels[:78] == 1).all()
    assert dataset.pad_field(p, 96) is p


@pytest.mark.slow
@needs_shared(HELA)
def test_a_field_of_unknown_scale_far_from_the_models_is_warned_about(tmp_path):
    """HeLa at 63x (cells about 40x LIVECell's area), named like LIVECell fields and given no pixel size: the
    summary says they look imaged at another magnification; a LIVECell field beside them is not named."""
    plate = tmp_path / "plate"
    plate.mkdir()
    for k, t in enumerate(("t000", "t040")):
        tifffile.imwrite(plate / f"HeLa_Phase_A1_1_00d0{k}h00m_1.tif", tifffile.imread(HELA / "02" / f"{t}.tif"))
    (plate / "A172_Phase_A7_1_00d00h00m_1.tif").write_bytes((EXAMPLES / "A172_Phase_A7_1_00d00h00m_1.tif").read_bytes())
    import os

    res = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "segment", str(plate), str(tmp_path / "out"),
                          "--num-cpus", "2", "--model", "small"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "2 of them look imaged at another magnification" in text and "HeLa_Phase_A1_1_00d0" in text
    assert "give --pixel-size" in text
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["last_run"]["fields_scale_assumed"] == 3 and run["last_run"]["fields_scale_doubtful"] == 2


def _doc_commands(page: str) -> list[str]:
    """The ``livecell-ray`` commands of a docs page's code blocks, continuation lines joined, comments cut."""
    import re

    text = (ROOT / "docs" / page).read_text()
    cmds = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if cmd.startswith("livecell-ray "):
                cmds.append(" ".join(cmd.split()))
    return cmds


@pytest.mark.slow
@needs_shared(HELA)
def test_the_curate_guide_runs_as_written_from_the_users_side(tmp_path):
    """docs/curate.md, every command in its order, on two HeLa frames named as a user's plate: run, curate,
    correct (the frame's silver truth saved over labels.tif, as napari would), train (72 s: the page's
    budget scaled down), register, list, and run the plate with the model by cell type and by name."""
    import os
    import shlex

    plate = tmp_path / "PLATE"
    plate.mkdir()
    truth = {}
    for k, t in enumerate(("000", "040")):
        name = f"HeLa_Phase_A1_1_00d0{k * 4}h00m_1.tif"
        tifffile.imwrite(plate / name, tifffile.imread(HELA / "01" / f"t{t}.tif"))
        truth[f"{k * 4}h"] = tifffile.imread(HELA / "01_ST" / "SEG" / f"man_seg{t}.tif")
    env = {**os.environ, "LIVECELL_RAY_MODELS": str(tmp_path / "models.json"), "COLUMNS": "200"}
    scaled = {"--time-hours 0.1": "--time-hours 0.02",
              "weights/small.pt": str(ROOT / "weights" / "small.pt"), "--fields 5": "--fields 1"}
    cmds = _doc_commands("curate.md")
    assert [c.split()[1] for c in cmds] == ["segment", "curate", "train", "models", "models", "segment", "segment"]
    for cmd in cmds:
        for a, b in scaled.items():
            cmd = cmd.replace(a, b)
        res = subprocess.run([sys.executable, "-m", "livecell_ray.cli", *shlex.split(cmd)[1:], *(
            ["--num-cpus", "2"] if cmd.startswith("livecell-ray segment") else [])], cwd=tmp_path,
            capture_output=True, text=True, timeout=900, env=env)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        if " curate " in f" {cmd} ":
            (folder,) = [p for p in (tmp_path / "fix").iterdir() if p.is_dir()]
            hours = folder.name.rsplit("_", 1)[1]
            assert tifffile.imread(folder / "labels.tif").shape == truth[hours].shape
            tifffile.imwrite(folder / "labels.tif", truth[hours].astype(np.uint16))  # the user's correction
        if " train " in cmd:  # the line that registers it, at the scale it was trained at (0.19 um/px / 0.5)
            assert "models add NAME" in res.stderr and "--pixel-size 0.38" in res.stderr, res.stderr[-2000:]
            conf = re.search(r"--conf (0\.\d+)", res.stderr).group(1)  # where its count matched the frame's
            scaled["--conf 0.6"] = f"--conf {conf}"
        if cmd.endswith("models list"):
            assert "hela" in res.stdout and "HeLa" in res.stdout
    for out in ("out", "out-hela", "out-all"):
        fields = open_results(str(tmp_path / out)).fields.df()
        assert len(fields) == 2 and (fields["n_cells"] > 0).all(), out
    run = json.loads((tmp_path / "out-hela" / "run.json").read_text())
    assert "hela" in json.dumps(run["provenance"]["models"])
    (mine,) = [m for m in run["provenance"]["models"].values() if "hela" in m["path"]]
    assert mine["conf"] == float(conf)  # the printed threshold, registered, is the one the run used
    low = open_results(str(tmp_path / "out-all")).df("SELECT min(confidence) AS c FROM cells")["c"].iloc[0]
    assert low >= float(conf) - 1e-6
