"""Progress bars for long data runs (``fmhub clean``, ``fmhub label``): rows done out of rows in all, on stderr.

The bar draws only on a terminal, so logs and captured output stay clean,
and disappears when done: the summary table printed after it is what stays.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console


class Bar:
    """A running bar: `start` sets the total once it is known, `advance` moves it on by ``n`` rows."""

    def __init__(self, progress, task) -> None:
        self._progress, self._task = progress, task

    def start(self, total: Optional[int]) -> None:
        self._progress.update(self._task, total=total)
        self._progress.start_task(self._task)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


@contextlib.contextmanager
def row_progress(console: Console, description: str, total: Optional[int] = None) -> Iterator[Bar]:
    """Yield a `Bar` for rows; with ``total`` None the bar waits for `Bar.start` (e.g. after counting the input)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, start=total is not None)
        yield Bar(progress, task)
