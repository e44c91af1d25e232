"""Rich console output: per-stage progress bars and the closing summary table."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, width=None if sys.stderr.isatty() else 130)


@contextmanager
def bar(description: str, total: int):
    """A progress bar; yields ``advance(n=1)``."""
    with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


def summary(title: str, metrics: dict, seconds: dict) -> Table:
    table = Table(title=title)
    table.add_column("stage")
    columns = sorted({k for m in metrics.values() for k in m})
    for col in columns:
        table.add_column(col, justify="right")
    table.add_column("seconds", justify="right")
    for stage, values in metrics.items():
        cells = [f"{values[c]:.4g}" if isinstance(values.get(c), float) else str(values.get(c, "")) for c in columns]
        table.add_row(stage, *cells, f"{seconds.get(stage, 0):.1f}")
    return table


def layer_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col.replace("error_", "err_"), justify="right" if col not in ("layer", "kept") else "left")
    for row in rows:
        table.add_row(*(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return table
