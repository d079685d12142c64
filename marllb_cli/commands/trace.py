"""`marllb trace stats|gen`: look at a trace, or generate one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marllb_cli.cli_support import JsonOption, console, reports_errors
from marllb_cli.errors import ConfigError

trace_app = typer.Typer(help="Inspect or generate request traces.", no_args_is_help=True)
gen_app = typer.Typer(help="Generate a synthetic trace.", no_args_is_help=True)
trace_app.add_typer(gen_app, name="gen")

FormatOption = Annotated[
    str, typer.Option("--format", "-f", help="auto, marllb (the papers' TSV), wikibench or parquet.")
]
DurationOption = Annotated[float, typer.Option(help="Seconds of traffic.")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")]
SeedOption = Annotated[int, typer.Option(help="Seed; the same seed gives the same trace.")]
#: The papers' traces' mean for-loop iterations of a CPU request (`traces.generate.PAPER_WORK_MEAN`, which
#: a test keeps equal: this module does not import pandas just for a default).
PAPER_WORK_MEAN = 3_670_000


@trace_app.command("stats")
@reports_errors
def stats(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Trace file.")],
    fmt: FormatOption = "auto",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed lines and count them.")] = False,
    json_: JsonOption = False,
) -> None:
    """Count, duration, rate over time, work distribution and class shares of a trace."""
    from marllb_cli.traces import read_trace, trace_stats

    trace, skipped = read_trace(file, fmt=fmt, skip_bad=skip_bad)
    result = {"file": str(file), "skipped_lines": skipped, **trace_stats(trace)}
    if json_:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{file}", show_header=False)
    table.add_row("requests", f"{result['requests']:,}" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    table.add_row("duration", f"{result['duration_s']:.1f} s")
    table.add_row("mean rate", f"{result['rate_per_s']:.1f} req/s")
    table.add_row(
        "rate over time", "  ".join(f"{b['rate_per_s']:.0f}" for b in result["rate_over_time"]) + "  req/s per tenth"
    )
    work = result["work"]
    if work["requests"]:
        table.add_row(
            "work (iterations)",
            f"mean {work['mean']:,.0f}  p50 {work['p50']:,.0f}  p90 {work['p90']:,.0f}  p99 {work['p99']:,.0f}",
        )
    table.add_row("classes", "  ".join(f"{c} {share:.1%}" for c, share in result["classes"].items()))
    console.print(table)


@gen_app.command("poisson")
@reports_errors
def gen_poisson(
    rate: Annotated[float, typer.Option(help="Requests per second.")],
    duration: DurationOption,
    out: OutOption,
    work_mean: Annotated[float, typer.Option(help="Mean for-loop iterations of a CPU request.")] = PAPER_WORK_MEAN,
    mix: Annotated[str, typer.Option(help="Class shares, e.g. cpu=0.75,static=0.25.")] = "cpu=1",
    seed: SeedOption = 0,
) -> None:
    """Poisson arrivals with exponential CPU work (the papers' for-loop traces), written as Parquet."""
    from marllb_cli.traces import poisson
    from marllb_cli.traces.generate import parse_mix

    _check_out(out)
    trace = poisson(rate=rate, duration=duration, work_mean=work_mean, mix=parse_mix(mix), seed=seed)
    _write(trace, out, duration)


@gen_app.command("wiki")
@reports_errors
def gen_wiki(
    rate: Annotated[float, typer.Option(help="Mean requests per second over a day.")],
    duration: DurationOption,
    out: OutOption,
    day: Annotated[float, typer.Option(help="Length of one diurnal cycle in seconds (compress a day).")] = 86_400.0,
    amplitude: Annotated[float, typer.Option(help="Diurnal swing: rate × (1 ± amplitude).")] = 0.4,
    pages: Annotated[
        int, typer.Option(help="Distinct wiki pages Page_1..Page_N; at most the MediaWiki servers' mediawiki.pages.")
    ] = 1000,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of page popularity.")] = 1.0,
    static_share: Annotated[float, typer.Option(help="Share of static-file requests.")] = 0.35,
    seed: SeedOption = 0,
) -> None:
    """A synthetic Wikipedia-shaped trace (diurnal rate, Zipf pages, static files), written as Parquet.

    Synthetic, not measured traffic: for real Wikipedia requests, read a WikiBench file instead.
    """
    from marllb_cli.traces import wiki

    _check_out(out)
    trace = wiki(
        rate=rate,
        duration=duration,
        day_s=day,
        amplitude=amplitude,
        pages=pages,
        zipf=zipf,
        static_share=static_share,
        seed=seed,
    )
    _write(trace, out, duration)


def _check_out(out: Path) -> None:
    if out.suffix != ".parquet":
        raise ConfigError(f"--out {out}: write a .parquet file")


def _write(trace, out: Path, duration: float) -> None:
    from marllb_cli.traces import write_parquet

    write_parquet(trace, out)
    console.print(f"wrote {len(trace):,} requests over {duration:g} s to {out}")
