"""``livecell-ray submit``, ``status`` and ``logs``: a plate as a Ray Job on a cluster."""

from __future__ import annotations

import sys

import typer

from livecell_ray.cli._app import fail, out_console


def submit(
    spec: str = typer.Argument(..., help="YAML job spec (see jobs/example_spec.yaml)"),
    address: str = typer.Option("http://127.0.0.1:8265", help="Ray dashboard / job server address"),
    python: str = typer.Option("python", help="Interpreter on the cluster that has livecell-ray's dependencies"),
    follow: bool = typer.Option(True, help="Stream logs until the job ends"),
) -> None:
    """Submit a plate as a Ray Job; prints the job id, then follows its logs and status."""
    from livecell_ray.config import SpecError
    from livecell_ray.pipeline import jobs

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


def status(job_id: str, address: str = typer.Option("http://127.0.0.1:8265")) -> None:
    """A submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from livecell_ray.pipeline import jobs

    try:
        out_console.print(jobs.status(job_id, address))
    except Exception as exc:
        fail(f"{job_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}")


def logs(job_id: str, address: str = typer.Option("http://127.0.0.1:8265")) -> None:
    """A submitted job's logs so far."""
    from livecell_ray.pipeline import jobs

    try:
        sys.stdout.write(jobs.logs(job_id, address))
    except Exception as exc:
        fail(f"{job_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
