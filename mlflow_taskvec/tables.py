"""The one table renderer: a pandas frame as plain text, markdown, csv or json.

Floats are written with ``digits`` decimals (a column may have its own), an empty
cell where a value is missing (None or NaN) in markdown, and ``|`` escaped in
markdown cells so a name cannot break the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

FORMATS = ("table", "text", "markdown", "csv", "json")


def render_table(
    frame,
    fmt: str,
    digits: int = 4,
    column_digits: Mapping[str, int] | None = None,
    hide: Sequence[str] = (),
    json_orient: str = "split",
) -> str:
    """``frame`` as ``table``/``text`` (aligned columns), ``markdown``, ``csv`` (every column) or
    ``json`` (every column; ``json_orient="records"`` gives one object per row, the index included)."""
    if fmt == "csv":
        return frame.to_csv(index=True)
    if fmt == "json":
        if json_orient == "records":
            return frame.reset_index().to_json(orient="records", indent=2, double_precision=15)
        return frame.to_json(orient=json_orient, indent=2)
    shown = frame.drop(columns=[c for c in hide if c in frame.columns])
    widths = dict(column_digits or {})

    def cell(column, value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return ""
            return f"{value:.{widths.get(column, digits)}f}"
        return "" if value is None else markdown_text(str(value))

    if fmt == "markdown":
        cols = [frame.index.name or "", *[str(c) for c in shown.columns]]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for idx, row in shown.iterrows():
            lines.append("| " + " | ".join([markdown_text(str(idx)), *(cell(c, row[c]) for c in shown.columns)]) + " |")
        return "\n".join(lines)
    if fmt not in ("table", "text"):
        raise ValueError(f"unknown table format {fmt!r}")
    return shown.to_string(float_format=lambda v: f"{v:.{digits}f}")


def markdown_text(text: str) -> str:
    """``text`` safe inside a markdown table cell: ``|`` escaped, line breaks as spaces."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def smaller_by(stored_bytes: int, dense_bytes: int) -> str:
    """How much smaller a stored layout is than the dense tensors: ``"11.5x smaller"``, or, when
    nothing is stored (every tensor all zeros), ``"nothing stored: every tensor is zero"``."""
    if stored_bytes == 0:
        return "nothing stored: every tensor is zero" if dense_bytes else "nothing stored"
    return f"{dense_bytes / stored_bytes:.1f}x smaller"
