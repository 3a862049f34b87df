"""`mmp janitor [--dry-run]`: terminate MMP-tagged EC2 instances past their time."""

from __future__ import annotations

import typer

from mmp.commands import app, console, esc, fail, print_json


@app.command()
def janitor(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be terminated."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
) -> None:
    """Terminate MMP-tagged instances whose run the pipeline concluded or that outlived their max runtime."""
    from mmp.backends.dlami_janitor import sweep

    try:
        findings = sweep(dry_run=dry_run)
    except Exception as exc:  # no credentials, no region, EC2 refused
        fail(f"could not list or terminate instances: {exc}")
    if as_json:
        print_json([f.to_dict() for f in findings])
        return
    out = console()
    if not findings:
        out.print("no MMP-tagged instances are running")
        return
    for f in findings:
        colour = {"keep": "green", "terminate": "red", "would terminate": "yellow"}[f.action]
        out.print(f"[{colour}]{f.action:>15}[/] " + esc(f"{f.instance_id} run={f.run_id or '-'} {f.state}: {f.reason}"),
                  soft_wrap=True)
