"""Plain-text tables and console for the command line when rich is not installed (a plain `pip install`).

`Table` and `Console` take the subset of rich's API that `bench.report` and `cli` use, so the same code prints
with either: rich's markup (`[green]...[/]`) is dropped, cells wrap between words only (never inside one), and
a table wider than the terminal's columns shrinks its widest columns first.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap

# rich markup made of style words only: "[bold red]", "[/]", "[/yellow]"; a literal "[bench]" is kept
_STYLE = r"(?:bold|dim|italic|underline|red|green|yellow|blue|magenta|cyan|white)"
_MARKUP = re.compile(rf"\[/?(?:{_STYLE}(?: {_STYLE})*)?\]")


def strip_markup(text: str) -> str:
    return _MARKUP.sub("", text)


def longest_word(text: str) -> int:
    return max((len(w) for w in text.split()), default=0)


class Table:
    """Columns of text, wrapped at spaces to fit a width: `add_column`, `add_row`, `add_section`, as rich's."""

    def __init__(self, title: str | None = None, show_header: bool = True, **_ignored):
        self.title = title
        self.show_header = show_header
        self.headers: list[str] = []
        self.right: list[bool] = []
        self.rows: list[list[str] | None] = []  # None: a section break

    def add_column(self, header: str = "", justify: str = "left", **_ignored) -> None:
        self.headers.append(header)
        self.right.append(justify == "right")

    def add_row(self, *cells: str) -> None:
        self.rows.append([strip_markup(str(c)) for c in cells])

    def add_section(self) -> None:
        self.rows.append(None)

    def _cells(self) -> list[list[str]]:
        body = [r for r in self.rows if r is not None]
        return ([self.headers] if self.show_header else []) + body

    def min_width(self) -> int:
        """The narrowest this table prints without splitting a word."""
        return frame_width(column_words(self._cells(), len(self.headers)))

    def render(self, width: int) -> str:
        widths = fit_widths(self._cells(), len(self.headers), width)
        rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        lines = [self.title.center(len(rule)).rstrip()] if self.title else []
        lines.append(rule)
        if self.show_header:
            lines += self._lines(self.headers, widths) + [rule]
        for row in self.rows:
            lines += [rule] if row is None else self._lines(row, widths)
        lines.append(rule)
        return "\n".join(lines)

    def _lines(self, row: list[str], widths: list[int]) -> list[str]:
        wrapped = [wrap(cell, w) for cell, w in zip(row, widths)]
        height = max(len(c) for c in wrapped)
        out = []
        for i in range(height):
            parts = []
            for cell, w, right in zip(wrapped, widths, self.right):
                text = cell[i] if i < len(cell) else ""
                parts.append(text.rjust(w) if right else text.ljust(w))
            out.append("| " + " | ".join(parts) + " |")
        return out


def wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken at spaces only (a longer word gets its own line)."""
    lines = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width, break_long_words=False, break_on_hyphens=False) or [""]
    return lines


def column_words(rows: list[list[str]], ncols: int) -> list[int]:
    """Each column's longest word: its narrowest width that splits no word."""
    return [max((longest_word(r[i]) for r in rows if i < len(r)), default=0) for i in range(ncols)]


def frame_width(widths: list[int]) -> int:
    """The printed width of a table with these column widths: "| " ... " | " ... " |" (rich's boxes alike)."""
    return sum(widths) + 3 * len(widths) + 1


def fit_widths(rows: list[list[str]], ncols: int, width: int) -> list[int]:
    """Column widths within `width`: each column's longest line, the widest shrunk first, never below its
    longest word (a table that cannot fit so is printed wider than `width`)."""
    lows = column_words(rows, ncols)
    widths = [max((max(map(len, c.split("\n"))) for c in (r[i] for r in rows if i < len(r))), default=0)
              for i in range(ncols)]
    while frame_width(widths) > width:
        slack = [w - low for w, low in zip(widths, lows)]
        if max(slack, default=0) <= 0:
            break
        widest = max((i for i in range(ncols) if slack[i] > 0), key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


class Console:
    """print() for tables and text, markup dropped; as wide as the terminal, or 400 columns into a pipe or a
    file unless COLUMNS says otherwise (as the rich console of `cli._console`)."""

    def __init__(self, file=None):
        self.file = file or sys.stdout
        self.is_terminal = self.file.isatty()
        if self.is_terminal or "COLUMNS" in os.environ:
            self.width = shutil.get_terminal_size().columns
        else:
            self.width = 400

    def print(self, thing: object = "") -> None:
        text = thing.render(self.width) if isinstance(thing, Table) else strip_markup(str(thing))
        print(text, file=self.file)


__all__ = ["Console", "Table", "fit_widths", "strip_markup", "wrap"]
