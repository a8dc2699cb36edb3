"""Small display objects: a table that renders as text and as HTML."""

from __future__ import annotations

import html
from typing import Any, Sequence


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Table:
    """Rows of plain values, shown as an aligned text table or an HTML table."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = ""):
        self.columns, self.rows, self.title = list(columns), [list(r) for r in rows], title

    def __repr__(self) -> str:
        cells = [self.columns] + [[str(c) for c in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(([self.title] if self.title else []) + lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in self.rows
        )
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def show_figure(fig) -> None:
    """Publish a matplotlib figure as PNG, whatever the matplotlib backend, then close it."""
    import base64
    import io

    import matplotlib.pyplot as plt
    from IPython.display import publish_display_data

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    publish_display_data({"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": repr(fig)})
    plt.close(fig)
