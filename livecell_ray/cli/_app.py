"""The one typer app every command group registers on, and the one-line error every command ends with."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Segment phase-contrast cell plates with YOLOv8 on Ray; query per-well results.")
console = Console(stderr=True)
out_console = Console()


def _version(value: bool) -> None:
    if value:
        import livecell_ray

        out_console.print(f"livecell-ray {livecell_ray.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit")) -> None:
    """livecell-ray: plate -> manifest -> Ray model actors -> OME-Zarr masks + Parquet statistics."""


def check_output_file(path: str | None, flag: str) -> None:
    """Before any work: a file to write is not a folder and its folder exists (one line, not a traceback
    after the query ran)."""
    import os

    if not path:
        return
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder; give a file in it, e.g. {os.path.join(path, 'out' + _suffix(flag))}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        fail(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        fail(f"{flag} {path}: the folder {parent} is not writable")


def _suffix(flag: str) -> str:
    return ".html" if flag == "--html" else ".csv"


def error_line(msg: str) -> None:
    """The one `error:` line every refused or stopped command ends with, on stderr."""
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    error_line(msg)
    raise typer.Exit(code)


def query_error(out: str, exc: Exception) -> str:
    """A failed query in one line: a damaged results file (truncated, corrupted) named with what repairs it,
    anything else as the query's own error."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if ".parquet" in first or "magic bytes" in first.lower() or "Parquet" in type(exc).__name__:
        return (f"{out}: a results file is damaged ({first}); `livecell-ray verify {out} --repair` names it and "
                f"un-commits its fields, and the same segment command then redoes them")
    return f"query failed: {first}"


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
