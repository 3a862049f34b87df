"""The `mmp` command, split by concern: each module adds its commands to `app`."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

app = typer.Typer(
    name="mmp",
    help="Managed MLOps Pipeline: commit an experiment.json, train with Horovod, track in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


PIPED_WIDTH = 140  # rich assumes 80 columns when output is not a terminal: too narrow for tables


def console(stderr: bool = False):
    """A rich console, made on first use (rich is not on the launch path)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(highlight=False, stderr=stderr, width=None if stream.isatty() else PIPED_WIDTH)


def err_console():
    return console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def esc(value: Any) -> str:
    """User text (paths, names, messages, values) made literal for a console that reads rich markup:
    `[/x]` in an experiment file must print, not crash."""
    from rich.markup import escape

    return escape(str(value))


def fail(message: str, code: int = 1) -> None:
    err_console().print(f"[bold red]error:[/] {esc(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)
