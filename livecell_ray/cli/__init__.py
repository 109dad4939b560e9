"""The ``livecell-ray`` command line (typer + rich): one app, a module per command group.

    run        segment, compact, verify
    training   train, evaluate, train-classifier, pseudo-label, curate
    answers    query, sql, report, export
    jobs       submit, status, logs
    models     models add, list, remove (the user's own)

The commands are registered here, in the order ``--help`` lists them.
"""

from __future__ import annotations

import sys

import typer

from livecell_ray.cli import answers, jobs, models, run, training
from livecell_ray.cli._app import app, console

__all__ = ["app", "main"]

for _command, _name in ((run.segment, None), (training.train, None), (training.evaluate, None),
                        (training.train_classifier, "train-classifier"), (training.pseudo_label, "pseudo-label"),
                        (training.curate, None),
                        (answers.query, None), (answers.sql, None), (run.compact, None), (run.verify, None),
                        (answers.report, None), (answers.export, None),
                        (jobs.submit, None), (jobs.status, None), (jobs.logs, None)):
    app.command(_name)(_command)
app.add_typer(models.app, name="models")


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
