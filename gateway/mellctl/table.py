"""Plain-text tables for `mellctl`, kept within 100 columns."""

from __future__ import annotations

from collections.abc import Sequence

WIDTH = 100


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: str = "") -> str:
    """Columns separated by two spaces; columns named in `right` (by header) right-aligned.
    The widest column is cut (ending in "~") when the table would pass 100 columns."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    over = sum(widths) + 2 * (len(widths) - 1) - WIDTH
    if over > 0:
        widest = max(range(len(widths)), key=widths.__getitem__)
        widths[widest] = max(len(headers[widest]), widths[widest] - over)
    aligned = set(right.split())

    def line(row: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                cell = cell[: widths[i] - 1] + "~"
            parts.append(cell.rjust(widths[i]) if headers[i] in aligned else cell.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def wrap_words(words: Sequence[str], indent: str = "  ") -> str:
    """Words joined by spaces, wrapped at 100 columns."""
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > WIDTH:
            lines.append(line)
            line = indent + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)
