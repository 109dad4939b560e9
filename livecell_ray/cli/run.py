"""``livecell-ray segment`` and ``compact``: a plate into OUT, and OUT's tables merged per well."""

from __future__ import annotations

from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from livecell_ray.cli._app import console, error_line, fail, out_console, parse_storage_options
from livecell_ray.config import LIVECELL_PATTERN, InferenceConfig, SegmentConfig


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
                                     "(default: the model's own, 832 for the shipped ones)"),
    conf: float | None = typer.Option(None, min=0.0, max=1.0, help="Detection confidence threshold (default: "
                                      "the model's own, from `models add --conf`, else 0.25)"),
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
    append: bool = typer.Option(False, help="Add this source's fields to an OUT that holds another source's "
                                "(run.json then lists every source)"),
    strict: bool = typer.Option(False, help="Exit non-zero when any field failed"),
    platemap: str | None = typer.Option(None, help="Plate map (CSV/Parquet: well[, plate], compound, dose, unit, "
                                        "control, ...): checked first, kept beside the results"),
    wait: bool = typer.Option(False, help="When another run is writing OUT, wait for it to finish instead of "
                              "stopping"),
    route: str = typer.Option("none", help="auto: send each well to the model of its cell type as the field "
                              "classifier predicts it from all the well's fields (a plate map's cell_line wins; "
                              "the general model where unsure); none: by the file name's type"),
    classifier: str = typer.Option("celltype", help="Field cell-type classifier: 'celltype' (shipped), a "
                                   "classifier .json (train-classifier), or 'none'; fills cell_type_predicted"),
) -> None:
    """Segment every field of a plate: masks to OME-Zarr, cell statistics to Parquet."""
    from livecell_ray import pipeline
    from livecell_ray.model.models import WeightsError
    from livecell_ray.plate.imaging import ImageError
    from livecell_ray.plate.manifest import ManifestError

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
                            append=append, max_pixels=max_pixels, stream_mb=stream_mb or None,
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
    from livecell_ray.plate import platemap as platemap_mod

    pm = None
    try:
        if platemap:  # checked whole against the plate's wells before anything is written
            pm, cfg = platemap_mod.for_run(platemap, cfg)
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
    except pipeline.RayDown as exc:
        fail_ray_down(exc)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume", 130)
    if pipeline.ray_down():  # the plate completed, but not every one of Ray's own processes lived through it
        pipeline.stop_local_ray()  # their agents would outlive this process
    if pm is not None:
        platemap_mod.save(planned[1], pm, platemap)
    _print_summary(summary)
    if strict and (summary.fields_failed or summary.unmatched):
        raise typer.Exit(1)


def fail_ray_down(exc: Exception) -> None:
    """Ray's own processes died: one line, the rest of that Ray killed (its agents outlive a dead raylet), and
    an exit that does not wait on Ray (its exit handler would talk to a dead GCS for a minute)."""
    import os
    import sys

    from livecell_ray import pipeline

    error_line(str(exc))
    pipeline.stop_local_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def _unmatched(s: Any, shown: int = 3) -> str:
    """How many files the pattern did not match, and the first names: a misspelt pattern shows at once."""
    import os

    names = [os.path.basename(f["path"]) for f in s.failures if f.get("stage") == "manifest"]
    if not s.unmatched or not names:
        return str(s.unmatched)
    more = f" and {s.unmatched - shown} more" if s.unmatched > shown else ""
    return f"{s.unmatched}: {', '.join(names[:shown])}{more} (each in failures/)"


def _print_summary(s: Any) -> None:
    t = Table(title="livecell-ray segment", show_header=False)
    t.add_row("fields in plate", str(s.fields_total))
    t.add_row("already done (skipped)", str(s.fields_skipped))
    t.add_row("segmented now", str(s.fields_done))
    t.add_row("failed", str(s.fields_failed))
    t.add_row("files not matching the pattern", _unmatched(s))
    t.add_row("cells", str(s.cells))
    t.add_row("time", f"{s.seconds:.1f} s ({s.fields_per_second:.2f} fields/s)")
    for why in s.restarts:
        t.add_row("restarted", why)
    if s.damaged:
        t.add_row("damaged, redone", f"{len(s.damaged)} committed fields whose files were not whole (first: "
                  f"{s.damaged[0]})")
    if s.scale_assumed:
        t.add_row("pixel size", f"assumed for {s.scale_assumed} fields: no --pixel-size and none in the files, so "
                  f"taken to be the model's (give --pixel-size UM if they are imaged at another scale)")
    if s.scale_doubtful:
        t.add_row("[yellow]scale?[/]", f"{s.scale_doubtful} of them look imaged at another magnification: the "
                  f"model found few cells there, none confidently (e.g. {s.scale_doubtful_example}); give "
                  f"--pixel-size UM (their micrometres per pixel) and rerun with --overwrite")
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


def compact(
    out: str = typer.Argument(..., help="A run's output location"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
    threads: int = typer.Option(8, min=1, help="Wells compacted at once"),
) -> None:
    """Merge each well's per-field Parquet files into one part a table (segment does it by default).

    Safe to stop at any point, to rerun, and to run while segment writes or another compaction runs:
    a reader never sees a row twice or misses one.
    """
    from livecell_ray import store
    from livecell_ray.store import compact as compact_mod

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


def verify(
    out: str = typer.Argument(..., help="A run's output location"),
    repair: bool = typer.Option(False, "--repair", help="Un-commit the damaged fields, so that the same segment "
                                "command redoes them"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
) -> None:
    """Read back every committed Parquet file and Zarr chunk; name what is damaged (exit 1), or with --repair
    un-commit it for a rerun."""
    from livecell_ray import store
    from livecell_ray.store import verify as verify_mod

    opts = parse_storage_options(storage_options)
    o = store.Outputs(out, opts)
    if not o.fs.exists(store.join(o.root, "fields")):
        fail(f"{out}: no livecell-ray results here (no fields/)")
    rep = verify_mod.verify(out, opts, repair=repair)
    for d in rep.damage:
        console.print(f"[bold red]damaged:[/] {d.path}: {d.reason}", highlight=False, soft_wrap=True)
    for p in rep.removed:
        console.print(f"un-committed: {p}", highlight=False, soft_wrap=True)
    out_console.print(f"{rep.fields} fields, {rep.files} files read: "
                      + ("no damage" if rep.ok else f"{len(rep.damage)} damaged"
                         + (f"; {len(rep.removed)} files un-committed: run the same segment command to redo them"
                            if repair else "; --repair un-commits them for a rerun")), highlight=False)
    if not rep.ok and not repair:
        raise typer.Exit(1)
