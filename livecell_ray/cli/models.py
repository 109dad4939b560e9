"""``livecell-ray models add | list | remove``: the user's own models beside the shipped ones."""

from __future__ import annotations

import typer
from rich.table import Table

from livecell_ray.cli._app import fail, out_console
from livecell_ray.config import DEFAULT_CONF

app = typer.Typer(help="Your own models beside the shipped ones: add, list, remove.", no_args_is_help=True)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="What --model calls it"),
    path: str = typer.Argument(..., help="Its .pt file (e.g. runs/train/NAME/weights/last.pt)"),
    cell_type: str | None = typer.Option(None, help="The cell type it serves: segment --model auto sends fields "
                                         "of this type (from their names) to it"),
    pixel_size: float | None = typer.Option(None, help="Micrometres per pixel of its training data (fields of "
                                            "another known size are resampled to it)"),
    data: str = typer.Option("", help="What it was trained on, in words"),
    figures: str = typer.Option("", help="What it measured, e.g. 'mask AP 0.47 on sequence 02'"),
    conf: float | None = typer.Option(None, help="Its confidence threshold where a run sets no --conf (`train` "
                                      "prints the one at which its count matched its training fields')"),
) -> None:
    """Register a model file (checksummed: a changed file is refused until added again)."""
    from livecell_ray.model import registry
    from livecell_ray.model.models import WeightsError

    try:
        record = registry.add(name, path, cell_type, pixel_size, data, figures, conf)
    except WeightsError as exc:
        fail(str(exc))
    out_console.print(f"{name}: {record['path']} (sha256 {record['sha256'][:12]}...) in {registry.models_file()}",
                      highlight=False)


@app.command("remove")
def remove(name: str = typer.Argument(..., help="A user model's name")) -> None:
    """Forget a user model (its file stays where it is)."""
    from livecell_ray.model import registry
    from livecell_ray.model.models import WeightsError

    try:
        registry.remove(name)
    except WeightsError as exc:
        fail(str(exc))
    out_console.print(f"{name}: removed from {registry.models_file()}", highlight=False)


@app.command("list")
def list_models() -> None:
    """Shipped and user models: what each serves, its data and scale, its checksum and figures."""
    from livecell_ray.model import models, registry

    try:
        user = registry.entries()
    except models.WeightsError as exc:
        fail(str(exc))
    t = Table()
    for c in ("name", "kind", "cell type", "um/px", "conf", "data", "figures", "sha256"):
        t.add_column(c, overflow="fold")
    sums = models.known_checksums()
    for file, e in sorted(models.model_entries().items()):
        if not isinstance(e, dict) or file not in sums:
            continue
        kind = "shipped classifier" if file.startswith(f"{models.CLASSIFIER}.") else "shipped"
        t.add_row(file.rsplit(".", 1)[0], kind, str(e.get("cell_type") or "*"), f"{e.get('pixel_size_um', '')}",
                  f"{DEFAULT_CONF:g}", str(e.get("data", "")), "weights/README.md", sums[file][:12])
    for name, r in sorted(user.items()):
        t.add_row(name, "user", str(r.get("cell_type") or ""), "" if r.get("pixel_size_um") is None
                  else f"{r['pixel_size_um']:g}", f"{r.get('conf') or DEFAULT_CONF:g}", r.get("data", ""),
                  r.get("figures", ""), r["sha256"][:12])
    out_console.print(t)
    out_console.print(f"user models: {registry.models_file()}", highlight=False)
