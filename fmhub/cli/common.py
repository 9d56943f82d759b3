"""What the command modules share: the two consoles, and small renderers."""

from __future__ import annotations

import sys
from typing import Any, Optional

from rich.console import Console, ConsoleDimensions
from rich.table import Table

PIPE_WIDTH = 10_000  # columns when writing to a pipe or a file: wide enough that no tensor name is cut


class _Console(Console):
    """A rich console that cuts nothing when its output is not a terminal (a pipe, a file, a test's capture):
    tables and lines get `PIPE_WIDTH` columns, not 80, unless ``COLUMNS`` says otherwise. A rule stays 80 wide."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def rule(self, *args: Any, **kwargs: Any) -> None:
        if self.is_terminal:
            return super().rule(*args, **kwargs)
        from rich.rule import Rule

        self.print(Rule(*args, **kwargs), width=80)


console = _Console()
err = _Console(stderr=True)


def utf8_stdout() -> None:
    """git may run us under LANG=C; tensor names are UTF-8 whatever the locale."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")


def say(text: str) -> None:
    """One line (or more) on stdout, as it is: no highlighting, no wrapping."""
    console.print(text, highlight=False, soft_wrap=True)


def warn(text: str) -> None:
    """``warning: TEXT`` on stderr."""
    err.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)


def args_of(ctx: Any) -> list[str]:
    """The words after ``fmhub``, as given (`fmhub.cli.ARGS`)."""
    from fmhub.cli import ARGS

    return list(ctx.meta.get(ARGS, ()))


def print_losses(losses: dict[str, float], reference: str) -> None:
    """The eval-loss table of ``sparsify --data`` and ``commit --data``."""
    table = Table("model", "eval loss (nats/token)", f"vs {reference}")
    for name, loss in losses.items():
        table.add_row(name, f"{loss:.4f}", f"{loss - losses[reference]:+.4f}")
    console.print(table)


def value(v: Optional[float]) -> str:
    """A metric with three decimals, or a dash."""
    return "—" if v is None else f"{v:.3f}"


def short(v: Any) -> str:
    """A step summary's value, short: floats in 4 digits, recursively."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {short(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(short(x) for x in v) + "]"
    return str(v)
