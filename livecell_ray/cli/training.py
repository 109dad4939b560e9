"""``livecell-ray train``, ``evaluate``, ``train-classifier`` and ``pseudo-label``: models, not plates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from livecell_ray.cli._app import console, fail, out_console
from livecell_ray.config import DEFAULT_CONF, LIVECELL_PIXEL_SIZE_UM, InferenceConfig, check_positive


def train(
    data: str = typer.Option(..., help="Labelled fields: a folder from `curate` (FIELD/image.tif + labels.tif), "
                             "the Cell Tracking Challenge layout (NN/tNNN.tif + NN_GT|NN_ST/SEG/man_segNNN.tif), "
                             "a mask folder (setN/raw.tif + instances_ids.png) or a COCO json"),
    images_dir: str | None = typer.Option(None, help="Images folder for COCO json"),
    val: str = typer.Option("", help="Comma-separated field names held out for validation"),
    model: str = typer.Option("yolov8n-seg.yaml", help="ultralytics model YAML (from scratch) or .pt to fine-tune"),
    epochs: int = typer.Option(300, min=1),
    imgsz: int = typer.Option(512, min=32),
    batch: int = typer.Option(8, min=1),
    workers: int = typer.Option(2, min=0, help="Data-loading processes per run"),
    scale: float | None = typer.Option(None, min=0.05, help="Resize fields by this factor before training "
                                       "(default: from --pixel-size to the model's scale, else 0.5); with "
                                       "--pixel-size, the model works at PIXEL_SIZE/SCALE um/px (e.g. 0.5 for "
                                       "cells at 63x: finer masks than at the shipped model's scale)"),
    pixel_size: float | None = typer.Option(None, min=0.001, help="Micrometres per pixel of --data: fields are "
                                            "resampled to the scale of --model's training data (a shipped "
                                            "model's; LIVECell's 1.24 for others); a folder from `curate` "
                                            "says its own"),
    tile: int | None = typer.Option(None, help="Cut fields into tiles of this size (default: the network input "
                                    "--imgsz, so that every field is seen at its scale; 0: whole fields, resized "
                                    "to the input)"),
    synthetic: int = typer.Option(0, min=0, help="Copy-paste synthetic fields to add"),
    backgrounds: str | None = typer.Option(None, help="Folder of unlabelled fields: their cell-free texture "
                                           "becomes extra copy-paste backgrounds"),
    cells: str | None = typer.Option(None, help="Cells per copy-paste field as MIN-MAX (e.g. 100-1200, up to "
                                     "confluence; default 0.5-2x the labelled fields' mean)"),
    pseudo: str | None = typer.Option(None, help="Folder of pseudo-labelled fields (from `pseudo-label`) added to "
                                      "the training split"),
    extra: str = typer.Option("", help="Other labelled data added to the training split, comma-separated "
                              "PATH@SCALE (e.g. ../shared/data/usiigaci/train@0.5: Usiigaci at LIVECell's scale)"),
    seed: int = typer.Option(0),
    recipe: bool = typer.Option(True, help="Our microscopy augmentation recipe (off: ultralytics defaults)"),
    device: str | None = typer.Option(None, help="'cpu', '0', ... (default: GPU if present)"),
    project: str = typer.Option("runs/train"),
    name: str = typer.Option("small"),
    time_hours: float | None = typer.Option(None, help="Wall-time budget; the LR schedule fits it"),
    lr0: float | None = typer.Option(None, min=0.0, help="AdamW starting learning rate (default: ultralytics' "
                                     "choice, or 1e-4 with --fine-tune)"),
    fine_tune: bool = typer.Option(False, "--fine-tune", help="A few corrected fields of a new line on a trained "
                                   "--model: a tenth of the learning rate, the backbone frozen, no mosaic or "
                                   "copy-paste (measured on HeLa DIC: docs/curate.md)"),
    resume: bool = typer.Option(True, help="Continue project/name/weights/last.pt when present"),
) -> None:
    """Train a YOLOv8-seg model offline (resumable), optionally with copy-paste expansion."""
    from livecell_ray.training import train as train_mod

    if fine_tune and not model.endswith(".pt"):
        fail(f"--fine-tune continues trained weights: --model must be a .pt (got {model})")
    at = data_pixel_size(data, pixel_size)
    if scale is None:
        scale = training_scale(data, model, pixel_size)
        console.print(f"scale: fields resized by {scale:.3g} to the model's training scale", highlight=False)
    run_dir = Path(project) / name
    data_yaml = run_dir.parent / f"{name}-data" / "data.yaml"
    if not (resume and (run_dir / "weights" / "last.pt").exists() and data_yaml.exists()):
        try:
            data_yaml = train_mod.prepare_dataset(train_mod.DataConfig(
                data=data, out=str(data_yaml.parent), images_dir=images_dir,
                val=tuple(v for v in val.split(",") if v), scale=scale, tile=imgsz if tile is None else (tile or None),
                pad_to=imgsz if tile is None else None, synthetic=synthetic, seed=seed,
                backgrounds=backgrounds, cells=_range(cells, "--cells"), pseudo=pseudo,
                extra=tuple(e for e in extra.split(",") if e)))
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    cfg = train_mod.TrainConfig(data=str(data_yaml), model=model, epochs=epochs, imgsz=imgsz, batch=batch,
                                device=device, project=project, name=name, seed=seed, recipe=recipe,
                                time_hours=time_hours, workers=workers,
                                lr0=train_mod.FINE_TUNE_LR0 if fine_tune and lr0 is None else lr0,
                                overrides=dict(train_mod.FINE_TUNE) if fine_tune else None)
    best = train_mod.train(cfg, resume=resume)
    out_console.print(f"best weights: {best}")
    if at is not None:  # the scale segment must resample fields to: what `models add --pixel-size` records
        conf = count_conf(str(best), data, images_dir, at, at / scale)
        console.print(f"it works at {at / scale:.3g} um/px: livecell-ray models add NAME {best} --cell-type TYPE "
                      f"--pixel-size {at / scale:.3g}" + (f" --conf {conf:g}" if conf is not None else ""),
                      highlight=False, soft_wrap=True)


#: At most this many of the training fields are segmented to choose a trained model's confidence threshold.
COUNT_CONF_FIELDS = 20


def count_conf(weights: str, data: str, images_dir: str | None, pixel_size: float, trained_at: float
               ) -> float | None:
    """The confidence threshold at which the trained model's count best matches its training fields' (at most
    COUNT_CONF_FIELDS of them), said on stderr beside the count error at the default; None (and the reason)
    when the fields cannot be read back as ground truth."""
    from livecell_ray.model import models
    from livecell_ray.model.segment import Segmenter
    from livecell_ray.training import evaluate as ev

    try:
        images = ev.load_labelled(data, images_dir)
    except (ValueError, FileNotFoundError, OSError) as exc:
        console.print(f"no confidence threshold chosen: {data}: {exc}", highlight=False)
        return None
    if not images:
        return None
    step = max(1, len(images) // COUNT_CONF_FIELDS)
    images = images[::step][:COUNT_CONF_FIELDS]
    w = models.Weights(Path(weights).stem, weights, models.sha256(weights), trained_at)
    seg = Segmenter({models.DEFAULT_KEY: w}, InferenceConfig(conf=min(ev.COUNT_CONF_GRID), half=False))
    conf, err, err0 = ev.count_threshold(seg, images, pixel_size)
    console.print(f"count on {len(images)} training field(s): error {err:.2f} at confidence {conf:g}, {err0:.2f} at "
                  f"the default {DEFAULT_CONF:g}", highlight=False, soft_wrap=True)
    return conf


def data_pixel_size(data: str, pixel_size: float | None) -> float | None:
    """The micrometres per pixel of ``data``: ``pixel_size``, else what a `curate` folder records (curate.json)
    when all its fields agree."""
    import json

    if pixel_size is None and (Path(data) / "curate.json").exists():
        sizes = {f.get("pixel_size_um") for f in json.loads((Path(data) / "curate.json").read_text())["fields"]}
        if len(sizes) == 1 and None not in sizes:
            pixel_size = float(sizes.pop())
    return pixel_size


def training_scale(data: str, model: str, pixel_size: float | None) -> float:
    """The resize factor that takes ``data``'s fields to ``model``'s training scale: from ``pixel_size``, or
    the pixel size a `curate` folder records (curate.json); 0.5 (Usiigaci's to LIVECell's) when neither says."""
    from livecell_ray.model import models

    pixel_size = data_pixel_size(data, pixel_size)
    if pixel_size is None:
        return 0.5
    try:
        target = models.resolve(model, trust=True).pixel_size or LIVECELL_PIXEL_SIZE_UM
    except models.WeightsError:  # a YAML (from scratch) or another file: LIVECell's scale
        target = LIVECELL_PIXEL_SIZE_UM
    return pixel_size / target


def _range(text: str | None, flag: str) -> tuple[int, int] | None:
    """'MIN-MAX' as two ints, or a clear error naming the flag."""
    if not text:
        return None
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        fail(f"{flag} must be MIN-MAX, e.g. 100-1200 (got {text!r})")
    if not 0 < lo <= hi:
        fail(f"{flag} needs 0 < MIN <= MAX (got {text!r})")
    return lo, hi


def evaluate(
    weights: str = typer.Argument(..., help="'small', 'big' or a .pt path"),
    annotations: str = typer.Argument(..., help="COCO json (LIVECell) or a mask folder (Usiigaci layout)"),
    images_dir: str | None = typer.Argument(None, help="Images folder for a COCO json"),
    imgsz: int | None = typer.Option(None, min=32, help="Network input size (default: the model's own)"),
    conf: float | None = typer.Option(None, min=0.0, max=1.0, help="Confidence threshold (default: the "
                                      "model's own, else 0.25)"),
    max_det: int = typer.Option(3000, min=1),
    tta: bool = typer.Option(False, help="Test-time augmentation, as in segment --tta"),
    select: str = typer.Option("", help="Comma-separated image names to evaluate (default: all)"),
    pixel_size: float | None = typer.Option(None, help="The images' micrometres per pixel, as segment --pixel-size "
                                            "(default: each file's metadata, else the model's scale)"),
    trust_weights: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of the table"),
) -> None:
    """LIVECell-protocol COCO evaluation (mask/box AP at maxDets 2000, AP50, AP75, F1, count error)."""
    from livecell_ray.model.models import WeightsError
    from livecell_ray.training import evaluate as ev

    try:
        check_positive(pixel_size, "--pixel-size", "micrometres")
        results, info = ev.run(weights, annotations, images_dir,
                               InferenceConfig(imgsz=imgsz, conf=conf, max_det=max_det, tta=tta), trust_weights,
                               [s for s in select.split(",") if s] or None, pixel_size)
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if json_out:
        out_console.print_json(json.dumps(ev.to_json(results, info)))
    else:
        sys.stdout.write(ev.table(results) + "\n")


def train_classifier(
    folders: str = typer.Option(..., "--data", help="Comma-separated folders of fields whose names carry the cell "
                                "type and well (LIVECell convention); every type needs two wells or more"),
    out: str = typer.Option("runs/celltype.json", "--out", help="Where the classifier goes (JSON)"),
    model: str = typer.Option("small", help="The general model whose cells are the features (as segment runs it)"),
    pixel_size: float = typer.Option(1.24, help="um/px of fields whose files do not say"),
    target_accuracy: float = typer.Option(0.95, min=0.5, max=1.0, help="Routing abstains below the probability "
                                          "at which held-out fields were right this often"),
) -> None:
    """Train the field cell-type classifier on the cells the general model finds, cross-validated by leaving
    one well out; prints the held-out accuracy per type and the abstention threshold it chose."""
    from rich.progress import Progress

    from livecell_ray.model import models
    from livecell_ray.training import classifier as classify

    for f in folders.split(","):
        if f and not Path(f).is_dir():
            fail(f"{f}: no such folder")
    cfg = classify.ClassifierConfig(model=model, pixel_size_um=pixel_size, target_accuracy=target_accuracy)
    fields = classify.collect([f for f in folders.split(",") if f])
    if not fields:
        fail(f"{folders}: no field whose name carries its cell type")
    try:
        weights = models.resolve(model)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("cell features", total=len(fields))
            x = classify.features(fields, cfg, lambda k, n: bar.update(task, completed=k))
        spec = classify.train(fields, x, cfg, weights.sha256)
    except (models.WeightsError, ValueError) as exc:
        fail(str(exc))
    classify.save(spec, out)
    cv = spec["cross_validation"]
    out_console.print_json(json.dumps({"classifier": out, **{k: cv[k] for k in (
        "fields", "wells", "field_accuracy", "well_consensus_accuracy", "per_type", "confusion", "abstention")}}))
    out_console.print(f"use it: livecell-ray segment PLATE OUT --route auto --classifier {out}", highlight=False)


def pseudo_label(
    weights: str = typer.Argument(..., help="'small', 'big' or a .pt path"),
    images_dir: str = typer.Argument(..., help="Folder of unlabelled fields"),
    out: str = typer.Argument(..., help="Where the pseudo-labelled fields go (Usiigaci layout, for train --pseudo)"),
    conf: float = typer.Option(0.4, min=0.0, max=1.0, help="Confidence a kept cell needs"),
    max_extent: float = typer.Option(0.92, min=0.0, max=1.0, help="Drop box-shaped masks (area / box area above)"),
    min_solidity: float = typer.Option(0.75, min=0.0, max=1.0, help="Drop ragged masks (area / convex area below)"),
    tta: bool = typer.Option(True, help="Test-time augmentation while labelling"),
    imgsz: int | None = typer.Option(None, min=32, help="Network input size (default: the model's own)"),
    trust_weights: bool = typer.Option(False),
) -> None:
    """Label unlabelled fields with a model's confident, well-shaped cells, for self-training."""
    from livecell_ray.model.models import WeightsError
    from livecell_ray.training import pseudolabel

    cfg = pseudolabel.PseudoConfig(conf=conf, max_extent=max_extent, min_solidity=min_solidity, tta=tta, imgsz=imgsz)
    try:
        rows = pseudolabel.pseudo_label(weights, images_dir, out, cfg, trust_weights)
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    kept, predicted = sum(r["kept"] for r in rows), sum(r["predicted"] for r in rows)
    out_console.print(f"{len(rows)} fields, {kept} of {predicted} predicted cells kept, in {out}")


def curate(
    out: str = typer.Argument(..., help="A run's output location"),
    dest: str = typer.Argument(..., help="Folder to write the fields to (one folder a field)"),
    fields: int = typer.Option(5, "--fields", min=1, help="How many fields"),
    where: str | None = typer.Option(None, help="SQL filter on the fields, e.g. \"cell_type = 'HeLa'\""),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
) -> None:
    """Fields worth correcting (least confident first, spread over wells and time) as image.tif + labels.tif,
    for napari; `train --data DEST` takes the corrected folder back."""
    import duckdb

    from livecell_ray.cli._app import parse_storage_options, query_error
    from livecell_ray.training.curate import curate as curate_fields

    try:
        done = curate_fields(out, dest, fields, parse_storage_options(storage_options), where)
    except duckdb.Error as exc:
        fail(query_error(out, exc))
    except (FileNotFoundError, ValueError) as exc:
        fail(f"{out}: {exc}")
    if done.empty:
        fail(f"{out}: no field to curate" + (f" where {where}" if where else ""))
    for r in done.itertuples():
        out_console.print(f"{dest}/{r.folder}: {r.n_cells} cells, mean confidence {r.mean_confidence:.2f}",
                          highlight=False)
    out_console.print(f"open one in napari: napari {dest}/{done.folder[0]}/image.tif {dest}/{done.folder[0]}/"
                      f"labels.tif (the second as labels); correct, save the labels layer over labels.tif, then: "
                      f"livecell-ray train --data {dest} --model small ...", highlight=False, soft_wrap=True)
