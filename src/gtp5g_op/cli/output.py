"""Output for people: a console that honours ``COLUMNS``, safe text, and tables that fit the width.

**Safe text.** Whatever came from outside (a comm, an executable path, a file path, a hook name from the
trace, a server's message) is shown through :func:`text`: a rich ``Text`` object, so ``[/x]`` is never
read as markup, with undecodable bytes and control characters (an escape sequence in a comm) shown as
``\\xNN`` instead of reaching the terminal.

**Tables at any width.** :func:`fit_table` lays out columns itself instead of letting rich shrink them:
the columns that identify a row (``key``) keep every character (pid, comm, hook names, file:line, URL);
the others get what is left, fold, and are dropped in their ``drop`` order when even their minimum
does not fit; a caption names what was dropped (``--json`` has everything).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gtp5g_op.errors import escape_control

DEFAULT_WIDTH = 80  # when neither a terminal nor COLUMNS says
MIN_WIDTH = 20


class _Console(Console):
    """rich's Console, but a reader that went away (``| head``) ends the command through the one error
    path (cli/errorpath.py: quietly, exit 0) instead of rich's own ``SystemExit(1)``, "the answer is no"."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def console(stderr: bool = False) -> Console:
    """A rich Console for people: ``COLUMNS`` when set (piped output too), else the terminal's width, else 80."""
    width = None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) >= MIN_WIDTH:
        width = int(columns)
    con = _Console(stderr=stderr, width=width, highlight=False)
    if width is None and not con.is_terminal:
        con.width = DEFAULT_WIDTH
    return con


def safe(value: object) -> str:
    """``value`` as a string a terminal shows literally: undecodable bytes and control characters as ``\\xNN``.

    A newline stays (cells may hold several lines); a tab becomes a space.
    """
    return "\n".join(escape_control(line) for line in str(value).replace("\t", " ").split("\n"))


def text(value: object, style: str = "") -> Text:
    """Untrusted ``value`` as a rich Text: no markup is interpreted, nothing reaches the terminal raw."""
    return Text(safe(value), style=style)


Cell = str | Text


@dataclass(frozen=True)
class Col:
    """A column of :func:`fit_table`.

    ``key``: identifies the row, never cut: shown whole (``wrap=False``) or wrapped only at spaces
    (``wrap=True``, e.g. a list of hook names or a sentence holding a URL). Other columns are shown
    whole (``min=None``: numbers, timestamps) or fold down to ``min`` characters (text), and are
    dropped, highest ``drop`` first, when the width runs out (``drop`` 0: never dropped).
    """

    header: str
    justify: Literal["left", "right", "center"] = "left"
    key: bool = False
    wrap: bool = False
    min: int | None = None
    drop: int = 0


_PAD = 2  # rich's default cell padding, one space each side
_SQUEEZE_MIN = 4  # narrowest a wrapping column is squeezed to before the keys fold too


def _lines(cell: Cell) -> list[str]:
    return (cell.plain if isinstance(cell, Text) else cell).split("\n")


def _natural(col: Col, cells: list[Cell]) -> int:
    return max(cell_len(line) for cell in [col.header, *cells] for line in _lines(cell))


def _longest_word(col: Col, cells: list[Cell]) -> int:
    return max((cell_len(w) for cell in [col.header, *cells] for line in _lines(cell) for w in line.split()),
               default=1)


def _need(col: Col, cells: list[Cell]) -> int:
    if col.key:
        return _longest_word(col, cells) if col.wrap else _natural(col, cells)
    return _natural(col, cells) if col.min is None else min(_natural(col, cells), max(col.min, 1))


def keys_fit(cols: Sequence[Col], rows: Sequence[Sequence[Cell]], width: int) -> bool:
    """Whether :func:`fit_table` can show every key fact of ``rows`` unbroken in ``width`` columns (a URL
    longer than its column is folded mid-word when it cannot)."""
    return _layout(cols, rows, width)[4]


def _layout(cols: Sequence[Col], rows: Sequence[Sequence[Cell]],
            width: int) -> tuple[list[int], dict[int, int], list[str], bool, bool]:
    """Columns kept, their widths, the headers dropped, whether the keys fit (folding only at spaces) and
    whether every word of theirs fits unbroken."""
    keep = list(range(len(cols)))
    column_cells = [[row[i] for row in rows] for i in range(len(cols))]
    need = [_need(c, cells) for c, cells in zip(cols, column_cells)]

    def total(idx: list[int]) -> int:
        return sum(need[i] + _PAD for i in idx) + len(idx) + 1  # borders: one between columns and at each edge

    dropped = []
    for i in sorted((i for i, c in enumerate(cols) if c.drop), key=lambda i: (-cols[i].drop, -i)):
        if total(keep) <= width:
            break
        keep.remove(i)
        dropped.append(cols[i].header)
    widths = {i: need[i] for i in keep}
    spare = width - total(keep)
    fits = unbroken = spare >= 0
    if not fits:  # too narrow even for the keys: squeeze what may wrap or fold, widest first
        flexible = [i for i in keep if cols[i].wrap or cols[i].min is not None]
        while spare < 0 and flexible:
            i = max(flexible, key=lambda i: widths[i])
            if widths[i] <= _SQUEEZE_MIN:
                break
            widths[i] -= 1
            spare += 1
        fits = spare >= 0  # else the keys themselves fold rather than be cut
    # Give what is left to the columns that want more, keys first, then secondary ones in order.
    for i in sorted(keep, key=lambda i: (not cols[i].key, cols[i].drop, i)):
        if spare <= 0:
            break
        grow = min(spare, _natural(cols[i], column_cells[i]) - widths[i])
        if grow > 0:
            widths[i] += grow
            spare -= grow
    return keep, widths, dropped, fits, unbroken


def fit_table(title: str | Text, cols: Sequence[Col], rows: Sequence[Sequence[Cell]], width: int,
              what: str = "--json") -> Table:
    """A table of ``rows`` that fits ``width`` columns without cutting a key fact (see :class:`Col`).

    ``what`` names where the dropped columns can be read in full.
    """
    keep, widths, dropped, fits, _ = _layout(cols, rows, width)
    caption = f"not shown at {width} columns: {', '.join(dropped)} ({what} has every field)" if dropped else None
    table = Table(title=title if isinstance(title, Text) else text(title), title_justify="left",
                  caption=caption, caption_justify="left", box=box.HEAVY_HEAD)
    for i in keep:
        c = cols[i]
        table.add_column(c.header, justify=c.justify, width=widths[i], overflow="fold",
                         no_wrap=c.key and not c.wrap and fits)
    for row in rows:
        table.add_row(*(row[i] if isinstance(row[i], Text) else text(row[i]) for i in keep))
    return table
