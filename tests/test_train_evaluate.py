"""Data conversion, copy-paste expansion, offline training with resume, LIVECell-protocol evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from livecell_ray.training import copypaste, dataset
from livecell_ray.training import evaluate as ev

from .conftest import USIIGACI, needs_shared


def _field(seed: int, n: int = 12, size: int = 96) -> dataset.LabelledField:
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 5, (size, size)).clip(0, 255).astype(np.uint8)
    lab = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    k = 0
    for _ in range(n):
        cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(3, 7)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (lab[disk] == 0).all():
            k += 1
            lab[disk] = k
            img[disk] = 200
    return dataset.LabelledField(f"f{seed}", img, lab)


def test_polygons_round_trip_to_the_same_masks(tmp_path):
    import cv2

    f = _field(1)
    n = dataset.write_yolo([f], tmp_path, "train")
    assert n == 1
    lines = (tmp_path / "labels" / "train" / "f1.txt").read_text().splitlines()
    assert len(lines) == f.labels.max()
    for line, lab in zip(lines, range(1, f.labels.max() + 1)):
        xy = (np.array(line.split()[1:], float).reshape(-1, 2) * 96).round().astype(np.int32)
        m = np.zeros((96, 96), np.uint8)
        cv2.fillPoly(m, [xy], 1)
        truth = f.labels == lab
        # polygon of the outer contour covers the disk (boundary pixels may differ by one)
        assert (m.astype(bool) & truth).sum() / (m.astype(bool) | truth).sum() > 0.7


def test_coco_polygon_and_rle_read_back(tmp_path):
    from pycocotools import mask as mask_utils

    f = _field(2)
    Image.fromarray(f.image).save(tmp_path / "a.png")
    anns = []
    for i, lab in enumerate(range(1, f.labels.max() + 1), start=1):
        m = np.asfortranarray((f.labels == lab).astype(np.uint8))
        rle = mask_utils.encode(m)
        seg = {"size": rle["size"], "counts": rle["counts"].decode()} if i % 2 else \
            [dataset.label_polygons((f.labels == lab).astype(np.int32))[0].reshape(-1).tolist()]
        anns.append({"id": i, "image_id": 1, "category_id": 1, "segmentation": seg, "iscrowd": 0,
                     "area": float(m.sum()), "bbox": mask_utils.toBbox(rle).tolist()})
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 96, "width": 96}], "annotations": anns,
            "categories": [{"id": 1, "name": "cell"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    back = dataset.read_coco(tmp_path / "a.json", tmp_path)[0]
    assert back.labels.max() == f.labels.max()
    rle_ids = [i for i in range(1, f.labels.max() + 1) if i % 2]
    for i in rle_ids:  # RLE instances come back exactly
        assert np.array_equal(back.labels == i, f.labels == i)


def test_copy_paste_is_deterministic_and_labels_exact():
    fields = [_field(s, 10, 128) for s in range(3)]
    a = copypaste.synthesize(fields, 3, seed=7)
    b = copypaste.synthesize(fields, 3, seed=7)
    c = copypaste.synthesize(fields, 3, seed=8)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.labels, y.labels) for x, y in zip(a, b))
    assert not all(np.array_equal(x.labels, y.labels) for x, y in zip(a, c))
    for f in a:
        ids = np.unique(f.labels)[1:]
        assert np.array_equal(ids, np.arange(1, len(ids) + 1)) and len(ids) > 3
        # pasted cells are bright (200 +- intensity jitter) on the ~100 background
        assert f.image[f.labels > 0].mean() > f.image[f.labels == 0].mean() + 40


def test_evaluate_perfect_and_empty_predictions():
    f = _field(3)
    im = ev.EvalImage("x", "", f.labels)
    perfect = ev.evaluate([im], [ev.Prediction(f.labels.astype(np.uint32), np.linspace(1, 0.5, f.labels.max()))])
    assert perfect.mask["AP"] == pytest.approx(1.0) and perfect.f1_50 == pytest.approx(1.0)
    assert perfect.count_error == 0
    none = ev.evaluate([im], [ev.Prediction(np.zeros_like(f.labels, np.uint32), np.zeros(0))])
    assert none.mask["AP"] == 0 and none.f1_50 == 0 and none.count_error == 1.0
    half = f.labels.copy()
    half[half > f.labels.max() // 2] = 0
    m = ev.evaluate([im], [ev.Prediction(half.astype(np.uint32), np.ones(f.labels.max() // 2))])
    assert 0.3 < m.mask["AP"] < 0.7 and m.recall_50 == pytest.approx((f.labels.max() // 2) / f.labels.max())


@pytest.mark.slow
def test_offline_training_stops_and_resumes_from_last(tmp_path):
    import os
    import signal
    import time

    fields = [_field(s, 8, 160) for s in range(6)]
    dataset.write_yolo(fields[:5], tmp_path / "ds", "train")
    dataset.write_yolo(fields[5:], tmp_path / "ds", "val")
    yaml_path = dataset.write_data_yaml(tmp_path / "ds")
    code = (
        "from livecell_ray.training.train import TrainConfig, train; "
        f"train(TrainConfig(data=r'{yaml_path}', epochs=6, imgsz=160, batch=2, device='cpu', "
        f"project=r'{tmp_path / 'runs'}', name='t', workers=0, cache=False))"
    )
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    results = tmp_path / "runs" / "t" / "results.csv"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:  # header + epoch 1
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(results.read_text().splitlines()) - 1
    assert 1 <= done_before < 6, "training must be stopped mid-run"
    threads = ("; import torch; print('threads', torch.get_num_threads()); from ultralytics.engine import trainer; "
               "from ultralytics.utils.checks import check_amp; print('restored', trainer.check_amp is check_amp)")
    p = subprocess.run([sys.executable, "-c", code + threads], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    # ultralytics trains a CPU on cores - 1 threads (and loads data in the same process): we use every core.
    assert f"threads {len(os.sched_getaffinity(0))}" in p.stdout.splitlines(), p.stdout[-500:]
    assert "restored True" in p.stdout.splitlines()  # the offline patches last one run, not the process
    epochs = [int(float(line.split(",")[0])) for line in results.read_text().splitlines()[1:]]
    assert epochs == list(range(1, 7)), epochs  # continued where it stopped, each epoch once
    assert (tmp_path / "cfg" / "Ultralytics" / "Arial.ttf").stat().st_size > 0  # bundled font, no download
    # A finished run asked to resume is a no-op.
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0 and len(results.read_text().splitlines()) == 7


@needs_shared(USIIGACI)
def test_evaluate_cli_on_real_fields_with_shipped_weights():
    p = subprocess.run([sys.executable, "-m", "livecell_ray.cli", "evaluate", "small", str(USIIGACI),
                        "--select", "set41,set42", "--imgsz", "704", "--json"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    allm = res["results"]["all"]
    assert allm["n_images"] == 2 and allm["n_gt"] > 100
    assert allm["mask"]["AP50"] > 0.3, allm["mask"]
    assert len(res["weights"]["*"]["sha256"]) == 64


@needs_shared(USIIGACI)
def test_prepare_dataset_from_mask_folder_with_copy_paste(tmp_path):
    from livecell_ray.training.train import DataConfig, prepare_dataset

    sub = tmp_path / "src"
    sub.mkdir()
    for s in ("set1", "set2", "set41"):
        (sub / s).symlink_to(Path(USIIGACI) / s)
    y = prepare_dataset(DataConfig(data=str(sub), out=str(tmp_path / "ds"), val=("set41",), scale=0.25,
                                   synthetic=2, seed=1))
    ds = tmp_path / "ds"
    assert sorted(p.name for p in (ds / "images" / "train").iterdir()) == [
        "set1.png", "set2.png", "synth0000.png", "synth0001.png"]
    assert [p.name for p in (ds / "images" / "val").iterdir()] == ["set41.png"]
    assert Image.open(ds / "images" / "val" / "set41.png").size == (256, 256)
    assert json.loads((ds / "prepared.json").read_text())["n_synthetic"] == 2
    assert y.exists()


def test_train_args_fine_tune_from_pt_and_recipe_steps_every_batch():
    from livecell_ray.training.train import RECIPE, TrainConfig, train_args

    scratch = train_args(TrainConfig(data="d.yaml", model="yolov8n-seg.yaml", batch=8, device="cpu"))
    tuned = train_args(TrainConfig(data="d.yaml", model="weights/small.pt", batch=8, device="cpu"))
    plain = train_args(TrainConfig(data="d.yaml", batch=8, device="cpu", recipe=False))
    assert scratch["pretrained"] is False and tuned["pretrained"] is True  # ultralytics drops .pt weights otherwise
    assert scratch["nbs"] == 8 and scratch["degrees"] == RECIPE["degrees"]
    assert "nbs" not in plain and "degrees" not in plain  # ultralytics' own defaults
    assert scratch["amp"] is False and scratch["plots"] is False
    # A fine-tune continues from trained weights: no warm-up (bias LR 0.1); a learning rate makes it AdamW's.
    assert tuned["warmup_epochs"] == 0.0 and "warmup_epochs" not in scratch
    slow = train_args(TrainConfig(data="d.yaml", model="weights/big.pt", device="cpu", lr0=5e-4))
    assert slow["optimizer"] == "AdamW" and slow["lr0"] == 5e-4 and "lr0" not in tuned


@needs_shared(USIIGACI)
def test_extra_data_joins_training_at_its_own_scale_and_its_held_out_fields_stay_out(tmp_path):
    """LIVECell-first training with Usiigaci at LIVECell's scale as extra data (--extra PATH@SCALE)."""
    from livecell_ray.training.train import DataConfig, prepare_dataset

    main, extra = tmp_path / "main", tmp_path / "extra"
    main.mkdir()
    extra.mkdir()
    (main / "set1").symlink_to(Path(USIIGACI) / "set1")
    for s in ("set2", "set41"):
        (extra / s).symlink_to(Path(USIIGACI) / s)
    prepare_dataset(DataConfig(data=str(main), out=str(tmp_path / "ds"), scale=1.0, val=("set41",),
                               extra=(f"{extra}@0.5",)))
    ds = tmp_path / "ds"
    assert sorted(p.name for p in (ds / "images" / "train").iterdir()) == ["set1.png", "set2.png"]
    assert [p.name for p in (ds / "images" / "val").iterdir()] == ["set41.png"]  # held out of the extra data
    assert Image.open(ds / "images" / "train" / "set1.png").size == (1024, 1022)  # PIL: (width, height)
    assert Image.open(ds / "images" / "train" / "set2.png").size == (512, 511)  # resized by its own factor
    with pytest.raises(ValueError, match="PATH@SCALE"):
        prepare_dataset(DataConfig(data=str(main), out=str(tmp_path / "ds2"), extra=(str(extra),)))


def test_texture_background_removes_cells_and_refuses_confluent_fields():
    rng = np.random.default_rng(0)
    flat = np.full((200, 300), 120, np.uint8) + rng.integers(0, 3, (200, 300)).astype(np.uint8)
    img = flat.copy()
    yy, xx = np.mgrid[:200, :300]
    for cy, cx in ((50, 60), (120, 200), (150, 80)):
        ring = np.abs(np.hypot(yy - cy, xx - cx) - 12) < 2
        img[ring] = 230  # a phase halo
        img[np.hypot(yy - cy, xx - cx) < 9] = 60
    back = copypaste.texture_background(img)
    assert back is not None
    assert np.abs(back.astype(int) - 120).max() < 25  # the cells are gone, the flat grey stays
    textured = rng.integers(0, 255, (200, 300)).astype(np.uint8)
    assert copypaste.texture_background(textured) is None  # nothing flat to keep


def test_copy_paste_reaches_confluence_with_exact_labels():
    lab = np.zeros((200, 300), np.int32)
    img = np.full((200, 300), 120, np.uint8)
    for k, (cy, cx) in enumerate(((40, 40), (100, 150), (150, 250), (60, 220)), start=1):
        m = (np.mgrid[:200, :300][0] - cy) ** 2 + (np.mgrid[:200, :300][1] - cx) ** 2 < 100
        lab[m], img[m] = k, 60
    fields = [dataset.LabelledField("f", img, lab)]
    dense = copypaste.synthesize(fields, 2, seed=3, cfg=copypaste.CopyPasteConfig(cells=(300, 400), tries=6),
                                 backgrounds=[np.full((200, 300), 110, np.uint8)])
    for f in dense:
        ids = np.unique(f.labels)
        assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # 1..K, no gaps
        assert len(ids) - 1 > 100  # far denser than the source's 4 cells
        assert (f.labels > 0).mean() > 0.5  # toward confluence
