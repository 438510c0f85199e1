"""Results shown in a notebook cell: lines of text, tables collapsed under a summary line."""

from __future__ import annotations

import html

from labkit.config.tables import Table


class Collapsed:
    """A table shown closed under a one-line summary (HTML ``<details>``); its text is the summary line
    only."""

    def __init__(self, table: Table, summary: str):
        self.table, self.summary = table, summary

    def _repr_html_(self) -> str:
        return (f"<details><summary>{html.escape(self.summary)} · {len(self.table)} rows (click to "
                f"open)</summary>{self.table._repr_html_()}</details>")

    def __repr__(self) -> str:
        return f"{self.summary} ({len(self.table)} rows; open the table in JupyterLab)"


class Lines:
    """Lines of text shown as a list (HTML) or one per line (text): the summary a notebook cell opens with."""

    def __init__(self, lines: list[str], title: str = ""):
        self.lines, self.title = lines, title

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in self.lines)
        return f"<b>{html.escape(self.title)}</b><ul>{items}</ul>" if self.title else f"<ul>{items}</ul>"

    def __repr__(self) -> str:
        return "\n".join(([self.title] if self.title else []) + self.lines)


def floor_pct(value: float, digits: int = 4) -> str:
    """A percentage rounded down, as text: ``100`` only when nothing differs (99.99996 shows as 99.9999)."""
    if value >= 100.0:
        return "100"
    scale = 10 ** digits
    return f"{int(value * scale) / scale:.{digits}f}"
