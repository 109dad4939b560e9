"""The ``livecell-ray`` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from livecell_ray.config import LIVECELL_PATTERN, InferenceConfig, SegmentConfig

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
    model: str = typer.Option("small", help="'small', 'big', a .pt path, or CELLTYPE=MODEL,...,*=MODEL"),
    batch_size: int = typer.Option(4, min=1, help="Fields per model batch"),
    replicas: int = typer.Option(1, min=1, help="Model replicas (Ray actors)"),
    gpus_per_replica: float = typer.Option(0.0, min=0.0, help="GPUs per model replica (0: CPU)"),
    cpus_per_replica: float = typer.Option(0.5, min=0.01, help="CPUs reserved per model replica"),
    pattern: str = typer.Option(LIVECELL_PATTERN, help="File-name regex with named groups"),
    manifest: str | None = typer.Option(None, help="Explicit CSV/Parquet manifest instead of scanning"),
    pixel_size: float | None = typer.Option(None, min=0.0, help="Micrometres per pixel (adds area_um2)"),
    imgsz: int = typer.Option(704, min=32, help="Network input size (long side)"),
    conf: float = typer.Option(0.25, min=0.0, max=1.0, help="Detection confidence threshold"),
    max_det: int = typer.Option(3000, min=1, help="Most cells kept per field"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start Ray locally)"),
    num_cpus: int | None = typer.Option(None, min=1, help="CPUs for a local Ray"),
    storage_options: str | None = typer.Option(None, help="fsspec storage options as JSON"),
    trust_weights: bool = typer.Option(False, help="Allow loading a .pt file that is not a shipped model"),
    overwrite: bool = typer.Option(False, help="Replace OUT made with another model or parameters"),
    strict: bool = typer.Option(False, help="Exit non-zero when any field failed"),
) -> None:
    """Segment every field of a plate: masks to OME-Zarr, cell statistics to Parquet."""
    from livecell_ray import pipeline
    from livecell_ray.imaging import ImageError
    from livecell_ray.manifest import ManifestError
    from livecell_ray.models import WeightsError

    opts = parse_storage_options(storage_options)
    cfg = SegmentConfig(source=source, out=out, model=model, trust_weights=trust_weights, batch_size=batch_size,
                        replicas=replicas, gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                        pattern=pattern, manifest=manifest, pixel_size=pixel_size, address=address,
                        num_cpus=num_cpus, storage_options=opts, overwrite=overwrite,
                        inference=InferenceConfig(imgsz=imgsz, conf=conf, max_det=max_det))
    try:
        import re

        re.compile(pattern)
    except re.error as exc:
        fail(f"--pattern is not a valid regular expression ({exc})")
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
    t.add_row("masks (OME-Zarr)", f"{s.out}/masks/")
    t.add_row("cells (Parquet)", f"{s.out}/cells/")
    t.add_row("fields (Parquet)", f"{s.out}/fields/")
    t.add_row("failures (Parquet)", f"{s.out}/failures/")
    t.add_row("provenance", f"{s.out}/run.json")
    out_console.print(t)


def main() -> None:  # pragma: no cover - entry for `python -m livecell_ray.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
