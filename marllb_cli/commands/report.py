"""`marllb report`: compare run directories in a table, a Markdown report and figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from marllb_cli.cli_support import JsonOption, console, err_console, reports_errors


@reports_errors
def report_command(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_DIR...", help="Run directories, or directories holding runs (e.g. runs/)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where report.md and the figures go.")] = Path("report"),
    baseline: Annotated[
        str | None, typer.Option(help="Method the ratios compare against (default: sed when present).")
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Rank methods by JCT (mean ± std, p50/p90/p99 per class), with throughput, errors and ratios to a baseline.

    Runs of the same method (seeds) are pooled; their spread is shown as the std of the per-run means.
    Writes report.md and PNG figures (JCT CDF, JCT over time, busy workers per server group, requests per
    server) into --out. Training directories (`marllb train --out`) add learning curves, `bench fidelity`
    directories a figure of testbed against simulator JCT per method.
    """
    from marllb_cli.report import (
        TERMINAL_COLUMNS,
        build_report,
        is_fidelity_dir,
        is_training_dir,
        scan_runs,
        short_names,
        shown_rows,
        table_cells,
        write_report,
    )

    trainings = [path for path in runs if is_training_dir(path)]
    fidelities = [path for path in runs if is_fidelity_dir(path)]
    if len(trainings) + len(fidelities) == len(runs):  # learning curves and fidelity figures only
        files = write_report(None, out, trainings, fidelities)
        console.print(f"report: {files[0]} ({len(trainings)} trainings, {len(fidelities)} fidelity benchmarks)")
        return
    found, skipped = scan_runs([path for path in runs if path not in trainings and path not in fidelities])
    report = build_report(found, baseline, skipped)
    files = write_report(report, out, trainings, fidelities)
    for warning in report.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}")
    if json_:
        print(json.dumps(report.as_json(), indent=2))
        return
    title = f"{len(report.runs)} runs, JCT in ms" + (f", ratios to {report.baseline}" if report.baseline else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    headers = {"rank": "#", "requests": "req", "mean / baseline": "mean×", "p99 / baseline": "p99×", "errors": "err"}
    for column in TERMINAL_COLUMNS:
        table.add_column(
            headers.get(column, column), justify="left" if column in ("method", "class") else "right", no_wrap=True
        )
    rows = shown_rows(report.rows)
    names = short_names([row["method"] for row in rows])
    for row in rows:
        cells = table_cells({**row, "method": names[row["method"]]}, TERMINAL_COLUMNS)
        table.add_row(*(escape(" ".join(cell.split())) for cell in cells))
    console.print(table)
    for method, name in names.items():
        if name != method:
            console.print(f"{escape(name)}: {escape(method)}", soft_wrap=True)
    console.print(f"report: {files[0]} ({len(files) - 1} figures)")
