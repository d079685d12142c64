"""`marllb report`: compare run directories in a table, a Markdown report and figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from marllb_cli.cli_support import JsonOption, console, err_console, print_table, reports_errors
from marllb_cli.stats import BOOTSTRAP_REPLICATES


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
    pool: Annotated[
        bool,
        typer.Option("--pool", help="Compare runs of different scenarios as one (default: a table per scenario)."),
    ] = False,
    replicates: Annotated[
        int,
        typer.Option(
            "--bootstrap", min=0, metavar="N", help="Bootstrap replicates per 95 % confidence interval (0: none)."
        ),
    ] = BOOTSTRAP_REPLICATES,
    json_: JsonOption = False,
) -> None:
    """Rank methods by JCT (mean ± std, p50/p90/p99 per class), with throughput, errors and ratios to a baseline.

    Runs are compared within their scenario (the system and the traffic: same servers, LBs, load or rate,
    trace): a folder holding several scenarios gives a table for each, never one pooled row, unless --pool.
    Within a scenario the runs of a method (seeds) are pooled; their spread is shown as the std of the
    per-run means, and mean, p90, p99 and the ratios to the baseline get 95 % bootstrap confidence intervals
    (over runs when a method has several, else over blocks of requests). Writes report.md and PNG figures
    (JCT CDF, JCT over time, busy workers per server group, requests per server) into --out. Training
    directories (`marllb train --out`) add learning curves, `bench fidelity` directories a figure of testbed
    against simulator JCT per method.
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
    report = build_report(found, baseline, skipped, pool=pool, replicates=replicates)
    files = write_report(report, out, trainings, fidelities)
    for warning in report.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}")
    if json_:
        print(json.dumps(report.as_json(), indent=2))
        return
    headers = {"rank": "#", "requests": "req", "mean / baseline": "mean×", "p99 / baseline": "p99×", "errors": "err"}
    headers["mean× 95% CI"] = "95% CI"
    shown = shown_rows(report.rows)
    names = short_names([row["method"] for row in shown])
    labels = report.scenario_labels()
    ratios = f", ratios to {report.baseline}" if report.baseline else ""
    for label in labels:
        title = f"{report.runs_in(label)} runs, JCT in ms{ratios}"
        if len(labels) > 1:
            title = f"{label}: {title}"
        table = Table(title=escape(title), box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
        for column in TERMINAL_COLUMNS:
            justify = "left" if column in ("method", "class") else "right"
            table.add_column(headers.get(column, column), justify=justify, no_wrap=True)
        for row in shown:
            if row["scenario"] == label:
                cells = table_cells({**row, "method": names[row["method"]]}, TERMINAL_COLUMNS)
                table.add_row(*(escape(" ".join(cell.split())) for cell in cells))
        print_table(table)
    for method, name in names.items():
        if name != method:
            console.print(f"{escape(name)}: {escape(method)}", soft_wrap=True)
    console.print(f"report: {files[0]} ({len(files) - 1} figures)")
