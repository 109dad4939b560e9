"""Offline, resumable ultralytics training with our recipe for phase-contrast cells.

The recipe differs from ultralytics' defaults where microscopy differs from COCO: grey images (no
hue/saturation jitter), no canonical orientation (rotations and vertical flips), cell sizes that
vary by an order of magnitude between cell types and objectives (wide scale jitter), and dense
fields (copy-paste of instances, max_det far above 300).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livecell_ray import offline

offline.configure()

#: Our augmentation recipe (ultralytics argument names).
RECIPE: dict[str, Any] = {
    "hsv_h": 0.0,
    "hsv_s": 0.0,
    "hsv_v": 0.3,
    "degrees": 180.0,
    "flipud": 0.5,
    "fliplr": 0.5,
    "scale": 0.6,
    "translate": 0.1,
    "mosaic": 1.0,
    "copy_paste": 0.3,
    "close_mosaic": 10,
}

#: Fine-tuning a trained model on a few corrected fields of a new line (`train --fine-tune`): a tenth of the
#: learning rate, the backbone frozen, no mosaic or copy-paste, little rescaling. On HeLa DIC (5 frames, 6 CPU
#: minutes, `--scale 0.5`) mask AP 0.49 over 3 draws, where the full recipe gave 0.24 in 20 minutes
#: (research/hela_curve.py, docs/curate.md "How many fields to correct").
FINE_TUNE_LR0 = 1e-4
FINE_TUNE: dict[str, Any] = {"mosaic": 0.0, "copy_paste": 0.0, "scale": 0.2, "freeze": 10}


@dataclass
class TrainConfig:
    """One training run; every field maps onto an ultralytics train() argument."""

    data: str
    model: str = "yolov8n-seg.yaml"
    epochs: int = 300
    imgsz: int = 512
    batch: int = 8
    device: str | None = None  # None: first GPU if present, else CPU
    project: str = "runs/train"
    name: str = "small"
    workers: int = 2
    patience: int = 0
    seed: int = 0
    recipe: bool = True
    cache: bool = True
    time_hours: float | None = None  # stop after this wall time (ultralytics' `time`)
    lr0: float | None = None  # AdamW's starting learning rate; None: ultralytics' automatic choice
    # Validate every epoch (ultralytics' default), or only after the last: on a GPU with a small data set
    # the per-epoch validation costs as much as the epoch, and runs that keep last.pt never read it.
    val: bool = True
    # ultralytics arguments over the recipe's (e.g. {"mosaic": 0.0, "freeze": 10}): a fine-tune on a few
    # fields of a new line wants gentler augmentation and a frozen backbone (research/hela_curve.py).
    overrides: dict[str, Any] | None = None


def _device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def _offline_amp_check(model: Any) -> bool:
    """Stand-in for ultralytics' check_amp, which downloads yolo26n.pt to compare fp32 and AMP outputs.

    Offline that download fails (or hangs on a machine with no route out); AMP is sound on every GPU
    ultralytics does not blacklist, and CPU training never uses it.
    """
    return next(model.parameters()).device.type == "cuda"


def _read_results_csv(trainer: Any) -> dict[str, list]:
    """ultralytics' results.csv reader through pandas, for installs without the optional polars."""
    import pandas as pd

    try:
        return pd.read_csv(trainer.csv).to_dict(orient="list")
    except Exception:  # as ultralytics: a missing or partial file only costs the history in the checkpoint
        return {}


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Train (or resume the stopped run at project/name/weights/last.pt); returns best.pt's path."""
    # Validation every epoch runs ultralytics' NMS, which takes torchvision's kernel only when torchvision is
    # already imported, else a Python loop that synchronises the GPU at every step (as in segment.Segmenter).
    import torchvision  # noqa: F401
    from ultralytics import YOLO

    run_dir = Path(cfg.project) / cfg.name
    last = run_dir / "weights" / "last.pt"
    if resume and last.exists():
        if _finished(last):  # ultralytics strips the optimizer from last.pt when a run completes
            return run_dir / "weights" / "best.pt"
        model, args = YOLO(str(last)), {"resume": True, "plots": False}
    else:
        model, args = YOLO(cfg.model), train_args(cfg)
    model.add_callback("on_pretrain_routine_start", _use_every_core)
    model.add_callback("on_val_start", _use_every_core)  # the final validation selects its device again
    with _offline_trainer():
        model.train(**args)
    return run_dir / "weights" / "best.pt"


@contextlib.contextmanager
def _offline_trainer() -> Iterator[None]:
    """ultralytics' trainer without its network needs, for the length of one training run only."""
    from ultralytics.engine import trainer as ul_trainer

    saved = ul_trainer.check_amp, ul_trainer.BaseTrainer.read_results_csv
    ul_trainer.check_amp = _offline_amp_check
    try:
        import polars  # noqa: F401  (ultralytics reads results.csv with it when saving checkpoints)
    except ImportError:
        ul_trainer.BaseTrainer.read_results_csv = _read_results_csv
    try:
        yield
    finally:
        ul_trainer.check_amp, ul_trainer.BaseTrainer.read_results_csv = saved


def _use_every_core(trainer: Any) -> None:  # a trainer or a validator
    """Train on every CPU core: ultralytics keeps one core back for data loading (NUM_THREADS is cores - 1)
    but then loads data in the main process on a CPU (workers=0), so a 2-core machine trained on one."""
    if trainer.device.type == "cpu":
        import os

        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def train_args(cfg: TrainConfig) -> dict[str, Any]:
    """The ultralytics train() arguments for one run (recipe, nominal batch, offline plots)."""
    args: dict[str, Any] = {
        "data": cfg.data,
        "epochs": cfg.epochs,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "device": _device(cfg.device),
        "project": str(Path(cfg.project).resolve()),
        "name": cfg.name,
        "exist_ok": True,
        "workers": cfg.workers,
        "patience": cfg.patience or cfg.epochs,
        "seed": cfg.seed,
        "deterministic": False,
        "plots": False,
        # A .pt model is fine-tuned from its weights; ultralytics discards them when pretrained=False.
        "pretrained": cfg.model.endswith(".pt"),
        "amp": _device(cfg.device) != "cpu",
        "cache": "ram" if cfg.cache else False,
        "single_cls": True,
        "max_det": 1000,
        "val": cfg.val,
    }
    if cfg.time_hours:
        args["time"] = cfg.time_hours
    if cfg.lr0 is not None:
        args.update(optimizer="AdamW", lr0=cfg.lr0)
    if args["pretrained"]:
        # Warm-up starts the biases at a learning rate of 0.1 and ramps the rest up over three epochs: right
        # from random weights, but on trained ones it undoes part of what a fine-tune is meant to continue.
        args["warmup_epochs"] = 0.0
    if cfg.recipe:
        args.update(RECIPE)
        # ultralytics accumulates gradients up to a nominal batch of 64: with 40 fields and batch 8 that
        # is less than one optimizer step per epoch. Microscopy sets are small: step every batch.
        args["nbs"] = cfg.batch
    args.update(cfg.overrides or {})
    return args


def _finished(last: Path) -> bool:
    """True when a run's last.pt belongs to a completed run (nothing left to resume)."""
    import torch

    ckpt = torch.load(last, map_location="cpu", weights_only=False)  # our own run's file
    return ckpt.get("optimizer") is None or ckpt.get("epoch", -1) == -1


@dataclass
class DataConfig:
    """Where labelled fields come from and how they become a YOLO-seg data set."""

    data: str  # mask folder (Usiigaci layout) or COCO json
    out: str  # where the YOLO-seg data set is written
    images_dir: str | None = None  # for COCO json
    val: tuple[str, ...] = ()  # field names held out for validation
    scale: float = 1.0  # resize factor (pixel scale) applied before training
    tile: int | None = None  # cut fields into tiles of this size
    # Pad fields whose long side is under this many px (the network input) up to it: ultralytics resizes every
    # training image to its input, and a field of known scale is never enlarged at inference, so a smaller
    # field would teach its cells larger than they are then seen.
    pad_to: int | None = None
    synthetic: int = 0  # copy-paste fields added to the training split
    seed: int = 0
    backgrounds: str | None = None  # folder of unlabelled fields whose cell-free texture becomes copy-paste backgrounds
    cells: tuple[int, int] | None = None  # cells per copy-paste field (default: 0.5-2x the sources' mean)
    pseudo: str | None = None  # folder of pseudo-labelled fields (Usiigaci layout) added to the training split
    # Other labelled sources added to the training split, each as "PATH@SCALE" (a mask folder, or a COCO json
    # with its images beside it in images/), resized by its own factor to this data set's pixel scale;
    # fields named in ``val`` are left out of them too.
    extra: tuple[str, ...] = ()


def prepare_dataset(cfg: DataConfig) -> Path:
    """Convert, split, rescale, tile and expand; returns the data.yaml path."""
    import json

    from livecell_ray.training import copypaste, dataset

    fields = dataset.read_labelled(cfg.data, cfg.images_dir)
    extras = []
    for spec in cfg.extra:
        path, _, factor = spec.rpartition("@")
        if not path or not factor.replace(".", "", 1).isdigit():
            raise ValueError(f"extra data {spec!r}: expected PATH@SCALE, e.g. ../shared/data/usiigaci/train@0.5")
        more = dataset.read_labelled(path, str(Path(path).parent / "images"))
        extras += [dataset.resize_field(f, float(factor)) for f in more]
    names = [f.name for f in fields + extras]
    unknown = set(cfg.val) - set(names)
    if unknown:
        raise ValueError(f"validation fields not in the data: {', '.join(sorted(unknown))}")
    fields = [dataset.resize_field(f, cfg.scale) for f in fields]
    train_f = [f for f in fields if f.name not in cfg.val]
    val_f = [f for f in fields if f.name in cfg.val]
    if cfg.pseudo:
        train_f += dataset.read_mask_folder(cfg.pseudo)
    train_f += [f for f in extras if f.name not in cfg.val]  # held-out fields of the extra data stay out
    val_f += [f for f in extras if f.name in cfg.val]
    synth = []
    if cfg.synthetic:
        backs = [b for b in map(copypaste.texture_background, _unlabelled_images(cfg.backgrounds, cfg.scale))
                 if b is not None] if cfg.backgrounds else []
        cp = copypaste.CopyPasteConfig(cells=cfg.cells, tries=6) if cfg.cells else None
        synth = copypaste.synthesize(train_f, cfg.synthetic, seed=cfg.seed, cfg=cp, backgrounds=backs)
    if cfg.tile:
        train_f = [t for f in train_f for t in dataset.tile_field(f, cfg.tile)]
        synth = [t for f in synth for t in dataset.tile_field(f, cfg.tile)]
    if cfg.pad_to:
        train_f, synth = ([dataset.pad_field(f, cfg.pad_to) for f in fs] for fs in (train_f, synth))
    out = Path(cfg.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    dataset.write_yolo(train_f + synth, out, "train")
    dataset.write_yolo(val_f or train_f[:1], out, "val")
    (out / "prepared.json").write_text(json.dumps({**asdict(cfg), "n_train": len(train_f), "n_synthetic": len(synth),
                                                   "n_val": len(val_f)}, indent=2))
    return dataset.write_data_yaml(out)


def _unlabelled_images(folder: str, scale: float) -> Iterator[np.ndarray]:
    """Every image under a folder, normalised and resized as the labelled fields are."""
    from livecell_ray.plate.imaging import normalize, read_image
    from livecell_ray.training.dataset import LabelledField, resize_field

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".tif", ".tiff", ".png", ".jpg"})
    if not paths:
        raise FileNotFoundError(f"{folder}: no images for copy-paste backgrounds")
    for p in paths:
        img = normalize(read_image(str(p)))
        yield resize_field(LabelledField(p.stem, img, np.zeros(img.shape, np.int32)), scale).image
