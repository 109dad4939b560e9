"""The ``livecell-ray`` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from livecell_ray.config import LIVECELL_PATTERN, InferenceConfig, SegmentConfig, check_positive

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Segment phase-contrast cell plates with YOLOv8 on Ray; query per-well results.")
console = Console(stderr=True)
out_console = Console()


@app.callback()
def _root() -> None:
    """livecell-ray: plate -> manifest -> Ray model actors -> OME-Zarr masks + Parquet statistics."""


def fail(msg: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--storage-options is not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(opts, dict):
        fail("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return opts


@app.command()
def segment(
    source: str = typer.Argument(..., help="Plate folder or prefix (local, s3://, gs://, memory://...)"),
    out: str = typer.Argument(..., help="Output location (local path or fsspec URL)"),
    model: str = typer.Option("auto", help="'auto' (each field's cell type's shipped model where there is one, "
                              "small otherwise), 'small', 'big', a .pt path, or CELLTYPE=MODEL,...,*=MODEL"),
    batch_size: int = typer.Option(4, min=1, help="Fields per model batch"),
    replicas: int = typer.Option(1, min=1, help="Model replicas (Ray actors)"),
    gpus_per_replica: float = typer.Option(0.0, min=0.0, help="GPUs per model replica (0: CPU)"),
    cpus_per_replica: float = typer.Option(0.5, min=0.01, help="CPUs reserved per model replica"),
    io_tasks: int | None = typer.Option(None, min=1, help="Shards in flight (each a task that reads, waits "
                                        "for the model, measures and writes; default: the cluster's CPUs)"),
    pattern: str = typer.Option(LIVECELL_PATTERN, help="File-name regex with named groups"),
    layout: str | None = typer.Option(None, help="Instrument naming preset instead of --pattern: livecell, incucyte, "
                                      "imagexpress, operetta, cellinsight, cytation, cellvoyager"),
    manifest: str | None = typer.Option(None, help="Explicit CSV/Parquet manifest instead of scanning"),
    pixel_size: float | None = typer.Option(None, help="Micrometres per pixel of the fields: each is resampled to "
                                            "its model's scale (masks and tables stay in the field's pixels) and "
                                            "gets area_um2 (default: the files' own metadata, else the model's)"),
    channel: str | None = typer.Option(None, help="The phase plane of multi-channel files: an index from 0, or an "
                                       "OME channel name"),
    stack_axis: str | None = typer.Option(None, help="t: each plane of a time-lapse TIFF stack is a timepoint"),
    interval: float | None = typer.Option(None, help="Hours between the planes of a --stack-axis t stack "
                                          "(default: the file's OME TimeIncrement)"),
    imgsz: int | None = typer.Option(None, min=32, help="Network input size (long side); larger fields are tiled "
                                     "(default: the model's own, 832 for small, 704 for big)"),
    conf: float = typer.Option(0.25, min=0.0, max=1.0, help="Detection confidence threshold"),
    max_det: int = typer.Option(3000, min=1, help="Most cells kept per field"),
    tta: bool = typer.Option(False, help="Test-time augmentation: masks averaged with the field's two mirror "
                             "images (3x the network's work; better mask edges)"),
    backend: str = typer.Option("torch", help="torch, or onnx (ONNX Runtime on CPU; needs the onnx extra)"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start Ray locally)"),
    num_cpus: int | None = typer.Option(None, min=1, help="CPUs for a local Ray"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
    max_pixels: int = typer.Option(64_000_000, min=1, help="Fields read whole larger than this fail (memory guard)"),
    stream_mb: float = typer.Option(64.0, min=0.0, help="Files of this many MiB or more are read, segmented and "
                                    "written a band of rows at a time, in bounded memory (0: read every file whole)"),
    stall_timeout: float = typer.Option(1800.0, min=0.0, help="Seconds without a finished field before the "
                                        "execution is started again over the fields left (0: wait forever)"),
    compact: bool = typer.Option(True, help="Afterwards, merge each well's per-field Parquet files into one "
                                 "part a table (fast queries; see 'livecell-ray compact')"),
    trust_weights: bool = typer.Option(False, help="Allow loading a .pt file that is not a shipped model"),
    overwrite: bool = typer.Option(False, help="Replace OUT made with another model or parameters"),
    strict: bool = typer.Option(False, help="Exit non-zero when any field failed"),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet: well[, plate], compound, dose, unit, "
                                        "control, ...): checked first, kept beside the results"),
    wait: bool = typer.Option(False, help="When another run is writing OUT, wait for it to finish instead of "
                              "stopping"),
    route: str = typer.Option("none", help="auto: send each field to the model of its cell type as the field "
                              "classifier predicts it from the pixels (--model TYPE=MODEL,...,*=MODEL); none: by the "
                              "file name's type"),
    classifier: str = typer.Option("celltype", help="Field cell-type classifier: 'celltype' (shipped), a .pt path, "
                                   "or 'none'; fills cell_type_predicted"),
) -> None:
    """Segment every field of a plate: masks to OME-Zarr, cell statistics to Parquet."""
    from livecell_ray import pipeline
    from livecell_ray.imaging import ImageError
    from livecell_ray.manifest import ManifestError
    from livecell_ray.models import WeightsError

    opts = parse_storage_options(storage_options)
    try:
        inference = InferenceConfig(imgsz=imgsz, conf=conf, max_det=max_det, backend=backend, tta=tta)
    except ValueError as exc:
        fail(f"--backend: {exc}")
    try:
        cfg = SegmentConfig(source=source, out=out, model=model, trust_weights=trust_weights, batch_size=batch_size,
                            replicas=replicas, gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                            io_tasks=io_tasks, pattern=pattern, manifest=manifest, pixel_size=pixel_size,
                            address=address, num_cpus=num_cpus, storage_options=opts, overwrite=overwrite,
                            max_pixels=max_pixels, stream_mb=stream_mb or None,
                            stall_timeout_s=stall_timeout or None, compact=compact, inference=inference,
                            wait_for_lease=wait, route=route,
                            classifier=None if classifier == "none" else classifier, channel=channel,
                            stack_axis=stack_axis, interval_h=interval, layout=layout)
    except ValueError as exc:
        fail(str(exc))

    try:
        import re

        re.compile(pattern)
    except re.error as exc:
        fail(f"--pattern is not a valid regular expression ({exc})")
    from livecell_ray import platemap as platemap_mod

    pm = None
    try:
        if platemap:  # checked whole against the plate's wells before anything is written
            from livecell_ray import manifest as manifest_mod

            pm = platemap_mod.read(platemap, opts)
            fields = manifest_mod.build(source, pattern, manifest, opts, channel, layout).fields
            platemap_mod.check_wells(pm, fields[["plate", "well"]], platemap)
    except platemap_mod.PlateMapError as exc:
        fail(str(exc))
    except ManifestError as exc:
        fail(pipeline.format_error(exc))
    try:
        planned = pipeline.plan(cfg)
        with Progress(TextColumn("[bold]segment"), BarColumn(), MofNCompleteColumn(), TextColumn("fields"),
                      TimeRemainingColumn(), console=console, transient=False) as bar:
            task = bar.add_task("fields", total=None)

            def on_field(res: dict[str, Any], done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)
                if res["status"] != "ok":
                    bar.console.print(f"[yellow]failed[/] ({res['stage']}): {res['error']}", highlight=False)

            summary = pipeline.run(cfg, on_field, planned)
    except (ManifestError, WeightsError, ImageError, pipeline.RunError) as exc:
        fail(pipeline.format_error(exc))
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume", 130)
    if pm is not None:
        platemap_mod.save(planned[1], pm, platemap)
    _print_summary(summary)
    if strict and (summary.fields_failed or summary.unmatched):
        raise typer.Exit(1)


def _print_summary(s: Any) -> None:
    t = Table(title="livecell-ray segment", show_header=False)
    t.add_row("fields in plate", str(s.fields_total))
    t.add_row("already done (skipped)", str(s.fields_skipped))
    t.add_row("segmented now", str(s.fields_done))
    t.add_row("failed", str(s.fields_failed))
    t.add_row("files not matching the pattern", str(s.unmatched))
    t.add_row("cells", str(s.cells))
    t.add_row("time", f"{s.seconds:.1f} s ({s.fields_per_second:.2f} fields/s)")
    for why in s.restarts:
        t.add_row("restarted", why)
    if s.scale_assumed:
        t.add_row("pixel size", f"assumed for {s.scale_assumed} fields: no --pixel-size and none in the files, so "
                  f"taken to be the model's (give --pixel-size UM if they are imaged at another scale)")
    if s.compaction:
        c = s.compaction
        t.add_row("compacted", f"failed ({c['error']}); the fields stand, rerun to retry" if "error" in c else
                  f"{c['wells_compacted']} of {c['wells']} wells: {c['files_before']} -> {c['files_after']} "
                  f"table files ({c['seconds']:.1f} s)" + (f"; {len(c['errors'])} wells failed" if c["errors"] else ""))
    t.add_row("masks (OME-Zarr)", f"{s.out}/masks/")
    t.add_row("cells (Parquet)", f"{s.out}/cells/")
    t.add_row("fields (Parquet)", f"{s.out}/fields/")
    t.add_row("failures (Parquet)", f"{s.out}/failures/")
    t.add_row("provenance", f"{s.out}/run.json")
    out_console.print(t)


@app.command()
def train(
    data: str = typer.Option(..., help="Mask folder (setN/raw.tif + instances_ids.png) or COCO json"),
    images_dir: str | None = typer.Option(None, help="Images folder for COCO json"),
    val: str = typer.Option("", help="Comma-separated field names held out for validation"),
    model: str = typer.Option("yolov8n-seg.yaml", help="ultralytics model YAML (from scratch) or .pt to fine-tune"),
    epochs: int = typer.Option(300, min=1),
    imgsz: int = typer.Option(512, min=32),
    batch: int = typer.Option(8, min=1),
    workers: int = typer.Option(2, min=0, help="Data-loading processes per run"),
    scale: float = typer.Option(0.5, min=0.05, help="Resize fields by this factor before training"),
    tile: int | None = typer.Option(None, help="Cut fields into tiles of this size"),
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
                                     "choice); lower it to fine-tune trained weights"),
    resume: bool = typer.Option(True, help="Continue project/name/weights/last.pt when present"),
) -> None:
    """Train a YOLOv8-seg model offline (resumable), optionally with copy-paste expansion."""
    from livecell_ray import train as train_mod

    run_dir = Path(project) / name
    data_yaml = run_dir.parent / f"{name}-data" / "data.yaml"
    if not (resume and (run_dir / "weights" / "last.pt").exists() and data_yaml.exists()):
        try:
            data_yaml = train_mod.prepare_dataset(train_mod.DataConfig(
                data=data, out=str(data_yaml.parent), images_dir=images_dir,
                val=tuple(v for v in val.split(",") if v), scale=scale, tile=tile, synthetic=synthetic, seed=seed,
                backgrounds=backgrounds, cells=_range(cells, "--cells"), pseudo=pseudo,
                extra=tuple(e for e in extra.split(",") if e)))
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    cfg = train_mod.TrainConfig(data=str(data_yaml), model=model, epochs=epochs, imgsz=imgsz, batch=batch,
                                device=device, project=project, name=name, seed=seed, recipe=recipe,
                                time_hours=time_hours, workers=workers, lr0=lr0)
    best = train_mod.train(cfg, resume=resume)
    out_console.print(f"best weights: {best}")


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


@app.command()
def evaluate(
    weights: str = typer.Argument(..., help="'small', 'big' or a .pt path"),
    annotations: str = typer.Argument(..., help="COCO json (LIVECell) or a mask folder (Usiigaci layout)"),
    images_dir: str | None = typer.Argument(None, help="Images folder for a COCO json"),
    imgsz: int | None = typer.Option(None, min=32, help="Network input size (default: the model's own)"),
    conf: float = typer.Option(0.25, min=0.0, max=1.0),
    max_det: int = typer.Option(3000, min=1),
    tta: bool = typer.Option(False, help="Test-time augmentation, as in segment --tta"),
    select: str = typer.Option("", help="Comma-separated image names to evaluate (default: all)"),
    pixel_size: float | None = typer.Option(None, help="The images' micrometres per pixel, as segment --pixel-size "
                                            "(default: each file's metadata, else the model's scale)"),
    trust_weights: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of the table"),
) -> None:
    """LIVECell-protocol COCO evaluation (mask/box AP at maxDets 2000, AP50, AP75, F1, count error)."""
    from livecell_ray import evaluate as ev
    from livecell_ray.models import WeightsError

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


@app.command("train-classifier")
def train_classifier(
    folders: str = typer.Option(..., "--data", help="Comma-separated folders of fields whose names carry the cell "
                                "type (LIVECell convention)"),
    val: str = typer.Option("", help="Comma-separated folder(s) of fields held out for validation (never trained on)"),
    out: str = typer.Option("runs/classify-data", help="Where the crop data set is written"),
    epochs: int = typer.Option(30, min=1),
    imgsz: int = typer.Option(128, min=32),
    time_hours: float | None = typer.Option(None),
    project: str = typer.Option("runs/classify"),
    name: str = typer.Option("celltype"),
) -> None:
    """Train the field cell-type classifier (YOLOv8-cls from its YAML) on crops of type-named fields."""
    from livecell_ray import classify

    cfg = classify.ClassifierConfig(epochs=epochs, imgsz=imgsz, time_hours=time_hours)
    train_folders = [f for f in folders.split(",") if f]
    val_folders = [f for f in val.split(",") if f]
    for f in train_folders + val_folders:
        if not Path(f).is_dir():
            fail(f"{f}: no such folder")
    held = {p.stem for f in val_folders for p in Path(f).iterdir() if p.suffix.lower() in classify.IMAGE_SUFFIXES}
    summary = classify.build_dataset(train_folders + val_folders, out, held, cfg)
    if not summary["fields"]["train"] or not summary["fields"]["val"]:
        fail(f"need type-named fields on both sides (train: {summary['fields']['train']}, "
             f"val: {summary['fields']['val']})")
    best = classify.train(out, project, name, cfg)
    last = best.parent / "last.pt"
    report = classify.accuracy_by_type(str(last), val_folders[0], held) if len(val_folders) == 1 else {}
    out_console.print_json(json.dumps({"weights": str(last), "held_out": report}))


@app.command("pseudo-label")
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
    from livecell_ray import pseudolabel
    from livecell_ray.models import WeightsError

    cfg = pseudolabel.PseudoConfig(conf=conf, max_extent=max_extent, min_solidity=min_solidity, tta=tta, imgsz=imgsz)
    try:
        rows = pseudolabel.pseudo_label(weights, images_dir, out, cfg, trust_weights)
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    kept, predicted = sum(r["kept"] for r in rows), sum(r["predicted"] for r in rows)
    out_console.print(f"{len(rows)} fields, {kept} of {predicted} predicted cells kept, in {out}")


def _emit(df: Any, fmt: str, output: str | None) -> None:
    """Print or save a table as table/csv/json/parquet."""
    if fmt == "parquet":
        if not output:
            fail("--format parquet needs --output FILE")
        df.to_parquet(output, index=False)
        console.print(f"wrote {len(df)} rows to {output}")
        return
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = df.to_json(orient="records", indent=2)
    elif fmt == "table":
        t = Table(show_lines=False)
        for c in df.columns:
            t.add_column(str(c), justify="right" if df[c].dtype.kind in "iuf" else "left")
        for row in df.itertuples(index=False):
            t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
        if output:
            fail("--output needs --format csv, json or parquet")
        out_console.print(t)
        return
    else:
        fail(f"unknown --format {fmt!r}: use table, csv, json or parquet")
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


def _open(out: str, storage_options: str | None, platemap: str | None = None):
    from livecell_ray.platemap import PlateMapError
    from livecell_ray.query import open_results

    opts = parse_storage_options(storage_options)
    from livecell_ray import store

    o = store.Outputs(out, opts)
    if not o.fs.exists(store.join(o.root, "fields")) and not o.fs.exists(store.join(o.root, "run.json")):
        fail(f"{out}: no livecell-ray results here (no fields/ or run.json)")
    try:
        return open_results(out, opts, platemap=platemap)
    except PlateMapError as exc:
        fail(str(exc))


@app.command()
def query(
    out: str = typer.Argument(..., help="A run's output location"),
    what: str = typer.Argument("wells", help="wells, fields, cells, growth or dose_response"),
    metrics: str = typer.Option(",".join(("fields", "cells", "cells_per_field_mean", "cells_per_field_sd",
                                          "confluence", "area_median", "failed")),
                                help="Comma-separated well metrics"),
    by: str | None = typer.Option(None, help="'timepoint' for per well x timepoint rows"),
    where: str | None = typer.Option(None, help="SQL filter on fields, e.g. \"cell_type = 'A172'\""),
    well: str | None = typer.Option(None, help="Only this well (fields, cells)"),
    limit: int | None = typer.Option(None, min=1, help="At most N rows"),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or parquet"),
    output: str | None = typer.Option(None, help="Write to this file instead of stdout"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet: well[, plate], compound, dose, "
                                        "unit, control, ...), kept beside the results for later queries"),
    metric: str = typer.Option("cells_per_field_mean", help="dose_response: the per-well metric fitted "
                               "(a well metric, or growth_rate_per_h / doubling_time_h)"),
    at: float | None = typer.Option(None, help="dose_response: the timepoint (h) of a well metric "
                                    "(default: each well's last)"),
) -> None:
    """Per-well answers (cells per field, confluence, area, shape, intensity, growth, dose-response), or rows."""
    import duckdb

    res = _open(out, storage_options, platemap)
    try:
        if what == "growth":
            df = res.growth()
        elif what == "dose_response":
            df = res.dose_response(metric, at)
        elif what == "wells":
            if by not in (None, "timepoint"):
                fail("--by takes only 'timepoint'")
            df = res.wells([m.strip() for m in metrics.split(",") if m.strip()], by == "timepoint", where)
        elif what in ("fields", "cells"):
            conds = [c for c in (where, f"well = '{well}'" if well else None) if c]
            sql = f"SELECT * EXCLUDE (path), path FROM {what}" + (f" WHERE {' AND '.join(conds)}" if conds else "")
            sql += " ORDER BY plate, well, timepoint" + (", label" if what == "cells" else "")
            df = res.df(sql)
        else:
            fail(f"unknown table {what!r}: use wells, fields, cells, growth or dose_response")
    except ValueError as exc:
        fail(str(exc))
    except duckdb.Error as exc:
        fail(f"query failed: {str(exc).splitlines()[0]}")
    if limit:
        df = df.head(limit)
    _emit(df, fmt, output)
    issues = res.platemap_issues()
    if what in ("wells", "growth", "dose_response") and len(issues):
        # On stderr, so that CSV or JSON on stdout stays one table; never dropped silently.
        console.print(f"plate map vs imaged wells: {len(issues)} mismatches", highlight=False)
        for r in issues.itertuples(index=False):
            console.print(f"  {r.plate} {r.well}: {r.issue}", highlight=False)


@app.command()
def sql(
    out: str = typer.Argument(..., help="A run's output location"),
    statement: str = typer.Argument(..., help="DuckDB SQL over views cells, fields, wells, failures"),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or parquet"),
    output: str | None = typer.Option(None),
    storage_options: str | None = typer.Option(None),
) -> None:
    """Any DuckDB SQL over the run's views."""
    import duckdb

    res = _open(out, storage_options)
    try:
        df = res.df(statement)
    except duckdb.Error as exc:
        fail(f"query failed: {str(exc).splitlines()[0]}")
    _emit(df, fmt, output)


@app.command()
def compact(
    out: str = typer.Argument(..., help="A run's output location"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
    threads: int = typer.Option(8, min=1, help="Wells compacted at once"),
) -> None:
    """Merge each well's per-field Parquet files into one part a table (segment does it by default).

    Safe to stop at any point, to rerun, and to run while segment writes or another compaction runs:
    a reader never sees a row twice or misses one.
    """
    from livecell_ray import compact as compact_mod
    from livecell_ray import store

    opts = parse_storage_options(storage_options)
    o = store.Outputs(out, opts)
    if not o.fs.exists(store.join(o.root, "fields")):
        fail(f"{out}: no livecell-ray results here (no fields/)")
    with Progress(TextColumn("[bold]compact"), BarColumn(), MofNCompleteColumn(), TextColumn("wells"),
                  console=console, transient=False) as bar:
        task = bar.add_task("wells", total=None)
        s = compact_mod.compact(out, opts, threads=threads,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    t = Table(title="livecell-ray compact", show_header=False)
    t.add_row("wells", str(s.wells))
    t.add_row("wells merged", str(s.wells_compacted))
    t.add_row("table files", f"{s.files_before} -> {s.files_after}")
    for e in s.errors:
        t.add_row("failed", e)
    out_console.print(t)
    if s.errors:
        raise typer.Exit(1)


@app.command()
def report(
    out: str = typer.Argument(..., help="A run's output location"),
    html_path: str = typer.Option("report.html", "--html", help="Where to write the page"),
    storage_options: str | None = typer.Option(None),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet), kept beside the results"),
) -> None:
    """A self-contained HTML report: heatmaps, growth and dose-response curves, areas, overlays."""
    from livecell_ray import report as report_mod

    _open(out, storage_options, platemap)
    path = report_mod.write(out, html_path, parse_storage_options(storage_options))
    out_console.print(f"report: {Path(path).resolve()}")


@app.command()
def submit(
    spec: str = typer.Argument(..., help="YAML job spec (see jobs/example_spec.yaml)"),
    address: str = typer.Option("http://127.0.0.1:8265", help="Ray dashboard / job server address"),
    python: str = typer.Option("python", help="Interpreter on the cluster that has livecell-ray's dependencies"),
    follow: bool = typer.Option(True, help="Stream logs until the job ends"),
) -> None:
    """Submit a plate as a Ray Job; prints the job id, then follows its logs and status."""
    from livecell_ray import jobs
    from livecell_ray.config import SpecError

    try:
        job_id = jobs.submit(spec, address, python)
    except SpecError as exc:
        fail(str(exc))
    except Exception as exc:  # connection refused, authentication, version mismatch: one line each
        fail(f"cannot submit to {address}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    out_console.print(f"job id: {job_id}")
    if not follow:
        return
    for chunk in jobs.follow(job_id, address):
        sys.stdout.write(chunk)
    st = jobs.status(job_id, address)
    out_console.print(f"job {job_id}: {st}")
    if st != "SUCCEEDED":
        raise typer.Exit(1)


@app.command()
def status(job_id: str, address: str = typer.Option("http://127.0.0.1:8265")) -> None:
    """A submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from livecell_ray import jobs

    try:
        out_console.print(jobs.status(job_id, address))
    except Exception as exc:
        fail(f"{job_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}")


@app.command()
def logs(job_id: str, address: str = typer.Option("http://127.0.0.1:8265")) -> None:
    """A submitted job's logs so far."""
    from livecell_ray import jobs

    try:
        sys.stdout.write(jobs.logs(job_id, address))
    except Exception as exc:
        fail(f"{job_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}")


def main() -> None:
    """Console entry point: usage errors (unknown option, missing argument) are one line too."""
    from typer import _click
    from typer._click import exceptions as cexc

    try:
        rv = app(standalone_mode=False)
    except cexc.NoArgsIsHelpError as exc:
        _click.echo(exc.ctx.get_help() if exc.ctx else "")
        sys.exit(0)
    except cexc.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "livecell-ray"
        console.print(f"[bold red]error:[/] {exc.format_message()} (see '{cmd} --help')", highlight=False,
                      soft_wrap=True)
        sys.exit(2)
    except cexc.ClickException as exc:
        console.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[bold red]error:[/] aborted")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
