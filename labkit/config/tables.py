"""Tables that notebooks display (HTML) and commands print (text); plain rows of dicts underneath."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Iterable, Sequence


class Table:
    """Rows of dicts with fixed columns; ``_repr_html_`` for Jupyter, ``str`` for terminals, ``to_csv``."""

    def __init__(self, rows: Iterable[dict], columns: Sequence[str] | None = None, title: str = ""):
        self.rows = [dict(r) for r in rows]
        self.columns = list(columns or dict.fromkeys(k for r in self.rows for k in r))
        self.title = title

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def _fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return "" if value is None else str(value)

    def __str__(self) -> str:
        cells = [[self._fmt(r.get(c)) for c in self.columns] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)))
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{self.title or 'table'} ({len(self.rows)} rows x {len(self.columns)} columns; print() it for"
            " the text)"
        )

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(self._fmt(r.get(c)))}</td>" for c in self.columns)
                       + "</tr>" for r in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_csv(self, path=None) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(buf.getvalue())
        return buf.getvalue()


def history_table(history: list[dict]) -> Table:
    """One row per epoch: lr, train loss/top-1, valid loss/top-1/top-5, seconds."""
    rows = [{"epoch": r["epoch"] + 1, "lr": r["lr"], "train loss": r["train"]["loss"],
             "train top-1": r["train"]["top1"],
             "valid loss": r["valid"]["loss"], "valid top-1": r["valid"]["top1"],
             "valid top-5": r["valid"]["top5"],
             "seconds": r.get("seconds")} for r in history]
    return Table(rows, title="training history")
