"""`mmp datasets`: list, add and prepare entries of the dataset catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmp.commands import app, console, esc, fail, print_json

datasets_app = typer.Typer(help="The dataset catalogue: a name and its location per platform.", invoke_without_command=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback()
def list_datasets(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the catalogue (the default when no sub-command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    from mmp.contract.datasets import load_catalogue, missing_files

    rows = []
    for entry in load_catalogue().values():
        folder = entry.local_path()
        ready = folder.is_dir() and not (entry.name in ("digits", "fashion") and missing_files(folder))
        rows.append({"name": entry.name, "local": str(folder), "local_ready": ready, "s3": entry.s3, "fsx": entry.fsx})
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title="datasets")
    for col in ("name", "local", "ready", "s3", "fsx"):
        table.add_column(col)
    for r in rows:
        table.add_row(esc(r["name"]), esc(r["local"]), "yes" if r["local_ready"] else "no", esc(r["s3"] or "-"),
                      esc(r["fsx"] or "-"))
    console().print(table)


@datasets_app.command("add")
def add(
    name: str,
    local: Optional[Path] = typer.Option(None, "--local", help="Folder used by the local platform."),
    s3: Optional[str] = typer.Option(None, "--s3", help="s3:// URI used by SageMaker."),
    fsx: Optional[str] = typer.Option(None, "--fsx", help="Path on FSx for Lustre (sagemaker-fsx, dlami)."),
) -> None:
    """Add or replace a catalogue entry."""
    from mmp.contract.datasets import add_dataset

    try:
        entry = add_dataset(name, local=str(local) if local else None, s3=s3, fsx=fsx)
    except ValueError as exc:
        fail(str(exc), 2)
    console().print(f"added dataset [bold]{esc(entry.name)}[/]")


@datasets_app.command("prepare")
def prepare(name: str = typer.Argument(..., help="digits (bundled with scikit-learn, no network)")) -> None:
    """Write a bundled dataset in the IDX format Fashion-MNIST uses."""
    from mmp.contract.datasets import prepare_digits

    if name != "digits":
        fail(f"only 'digits' can be prepared offline; put Fashion-MNIST IDX files in a folder and "
             f"`mmp datasets add {name} --local DIR`", 2)
    path = prepare_digits()
    console().print(f"prepared [bold]digits[/] in {esc(path)}")
