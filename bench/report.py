"""One line per figure that ``make bench`` (``python -m bench``) gathers into one table.

A benchmark prints its own detailed output and, for each figure a goal speaks of, one
``figure(...)`` line: ``FIGURE<TAB>name<TAB>value<TAB>goal<TAB>before``.
"""

from __future__ import annotations

PREFIX = "FIGURE\t"


def figure(name: str, value: str, goal: str = "", before: str = "") -> None:
    """Print one figure for the combined table (``before``: the figure it replaces)."""
    cells = (name, value, goal, before)
    print(PREFIX + "\t".join(c.replace("\t", " ") for c in cells), flush=True)
