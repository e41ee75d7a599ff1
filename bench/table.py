"""The one text-table formatter behind every table bench/ prints.

    from bench.table import Col, format_table, fmt
    cols = [Col("case", "<"), Col("ms")]
    print(format_table(cols, [["decode", fmt(1.25, ".1f")], ["prefill", fmt(None, ".1f")]]))

Callers turn their figures into strings (they know the units and the
precision); this module only aligns them.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Col", "format_table", "fmt"]

SEP = "  "


@dataclass(frozen=True)
class Col:
    """A column: its header, its alignment ("<" left, ">" right) and a
    minimum width. A minimum width lets rows printed one at a time, as they
    are measured, line up with a header printed before them."""
    name: str
    align: str = ">"
    width: int = 0


def fmt(x, spec, na="-"):
    """``format(x, spec)``, or ``na`` for None."""
    return na if x is None else format(x, spec)


def format_table(cols, rows, header=True) -> str:
    """Aligned text: the header, a rule under each column, then the rows.

    A row is a list of strings, one per column. A shorter row (a failure's
    message) justifies all but its last cell, then prints that one whole;
    it does not widen the columns. None prints an empty line (between
    groups). ``header=False``: the row lines alone.
    """
    full = [r for r in rows if r is not None and len(r) == len(cols)]
    widths = [max([c.width, len(c.name)] + [len(r[i]) for r in full]) for i, c in enumerate(cols)]

    def line(cells):
        just = [c.ljust(w) if col.align == "<" else c.rjust(w) for c, col, w in zip(cells, cols, widths)]
        if len(cells) < len(cols):
            just[-1] = cells[-1]
        return SEP.join(just).rstrip()

    out = [line([c.name for c in cols]), SEP.join("-" * w for w in widths)] if header else []
    out += ["" if r is None else line(r) for r in rows]
    return "\n".join(out)
