"""Request traces: reading the papers' TSV, WikiBench and our Parquet, and generating Poisson traffic.

A trace is a `pandas.DataFrame` sorted by time with the columns of `TRACE_COLUMNS`:
`t` (seconds from the first request), `path` (the HTTP path), `class` (cpu | static | wiki) and `work`
(for-loop iterations of a CPU request, NaN when the path does not say).
"""

from marllb_cli.traces.formats import (
    TRACE_CLASSES,
    TRACE_COLUMNS,
    classify,
    read_marllb_tsv,
    read_trace,
    read_wikibench,
    trace_stats,
    trace_window,
    write_parquet,
)
from marllb_cli.traces.generate import poisson, wiki

__all__ = [
    "TRACE_CLASSES",
    "TRACE_COLUMNS",
    "classify",
    "poisson",
    "read_marllb_tsv",
    "read_trace",
    "read_wikibench",
    "trace_stats",
    "trace_window",
    "wiki",
    "write_parquet",
]
