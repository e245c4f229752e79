"""A picture of what a version is made of: the lineage graph drawn with matplotlib.

Inputs stand left of what they made (the composite at the right edge), one
column per level; a model used twice (the base of a composite and of each of
its task vectors) is drawn once. Each box names the model (registered name and
version, logged model id or path), its kind, task or method, and fingerprint;
each arrow says the input's role and weight. Aliases are left out: they move,
and the picture logged with a version should stay true.

No system binary (Graphviz) is needed: the layout is a simple layered one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_taskvec.engine.output import write_file
from mlflow_taskvec.mlflow.lineage import Node, lineage

PICTURE_NAME = "lineage.png"
DPI = 110
_COLUMN_INCHES = 3.4
_ROW_INCHES = 0.95
_COLORS = {
    "composite": "#fde2b8",
    "logged composite": "#fde2b8",
    "task_vector": "#cfe3f7",
    "logged task_vector": "#cfe3f7",
    "model": "#dcefd8",
    "logged model": "#eeeeee",
}
_PROBLEM_COLOR = "#f7c9c9"
_PAD = 0.4  # a box's padding around its text, in font sizes
_LABEL_AT = 0.36  # where along an arrow's first leg its label sits


@dataclass(eq=False)
class _Box:
    node: Node | None  # None: a waypoint of an edge that skips columns
    column: int = 0  # 0: the root; larger: further upstream
    row: float = 0.0
    parents: list["_Box"] = field(default_factory=list)
    children: list[tuple["_Box", Node]] = field(default_factory=list)  # (the input's box, the edge's node: role, weight)


@dataclass
class _Edge:
    source: _Box  # the input
    target: _Box  # what it feeds
    node: Node  # the input as its parent records it: role, weight
    waypoints: list[_Box]  # one per column in between, from the input's side


def _boxes(root: Node) -> list[_Box]:
    """One box per model (by URI), with its longest distance from the root as its column."""
    by_uri: dict[str, _Box] = {}
    order: list[_Box] = []

    def visit(node: Node, parent: _Box | None) -> None:
        key = node.uri if node.kind != "cycle" else f"{node.uri} (cycle)"  # a cycle's end is a box of its own
        box = by_uri.get(key)
        seen = box is not None
        if not seen:
            box = by_uri[key] = _Box(node)
            order.append(box)
        if parent is not None:
            parent.children.append((box, node))
        if not seen:  # a model drawn once: its inputs are those of its first appearance
            for child in node.children:
                visit(child, box)

    visit(root, None)
    # Longest-path columns: every input stands left of everything it feeds.
    changed = True
    while changed:
        changed = False
        for box in order:
            for child, _ in box.children:
                if child.column <= box.column:
                    child.column, changed = box.column + 1, True
    return order


def _layout(boxes: list[_Box]) -> tuple[list[_Box], list[_Edge], int]:
    """Waypoints for edges that skip columns (so that no edge runs behind a box), and rows:
    within each column, boxes sit in the order of the mean row of what they feed (first seen first)."""
    columns: dict[int, list[_Box]] = {0: [boxes[0]]}
    edges = []
    for box in boxes:  # boxes and waypoints join their columns in the order their parents list them
        for child, node in box.children:
            waypoints, above = [], box
            for column in range(box.column + 1, child.column):
                point = _Box(None, column, parents=[above])
                columns.setdefault(column, []).append(point)
                waypoints.append(point)
                above = point
            child.parents.append(above)
            if child not in columns.setdefault(child.column, []):
                columns[child.column].append(child)
            edges.append(_Edge(child, box, node, waypoints[::-1]))
    height = max(len(c) for c in columns.values())
    for column in sorted(columns):
        members = columns[column]
        if column > 0:
            members.sort(key=lambda b: sum(p.row for p in b.parents) / len(b.parents))
        offset = (height - len(members)) / 2
        for i, box in enumerate(members):
            box.row = offset + i
    return [b for c in columns.values() for b in c], edges, height


def _label(node: Node) -> str:
    uri = node.uri
    if node.version is not None and uri.startswith("models:/"):
        uri = uri[len("models:/") :].rsplit("/", 1)[0] + f"  v{node.version}"
    what = node.kind
    if node.task:
        what += f"  task {node.task}"
    if node.method:
        what += f"\n{node.method}" + (f"  scale {node.scale}" if node.scale else "")
    lines = [uri, what]
    if node.fingerprint:
        lines.append(f"fp {node.fingerprint[:16]}")
    if node.problem:
        lines.append(f"!! {node.problem[:60]}")
    return "\n".join(lines)


def _edge_label(node: Node) -> str:
    if isinstance(node.weight, dict):  # a per-layer weight: too long for an arrow (the description has it)
        return f"{node.role} per layer ({len(node.weight)} globs)"
    return node.role + (f" {node.weight:g}" if node.weight is not None else "")


def draw_lineage(root: Node, path: "str | os.PathLike", overwrite: bool = False) -> tuple[int, int]:
    """Draw ``root``'s lineage as a PNG at ``path`` (written whole or not at all); returns its (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed, edges, height = _layout(_boxes(root))
    width = max(b.column for b in placed) + 1
    size = (_COLUMN_INCHES * width + 0.4, _ROW_INCHES * height + 0.8)
    fig = plt.figure(figsize=size, dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.4, -0.6)
    ax.axis("off")

    def at(box: _Box) -> tuple[float, float]:
        return width - 1 - box.column, box.row  # the root at the right edge

    artists = {}
    for box in placed:
        if box.node is None:
            continue
        node = box.node
        bad = bool(node.problem) or node.kind in ("missing", "cycle")
        artists[box] = ax.text(
            *at(box), _label(node), ha="center", va="center", family="monospace", fontsize=7,
            bbox=dict(boxstyle=f"round,pad={_PAD}", facecolor=_PROBLEM_COLOR if bad else _COLORS.get(node.kind, "white"),
                      edgecolor="#b00000" if bad else "#555555", linestyle="--" if bad else "-"),
        )
    # each box's left and right side in data coordinates, for the edge labels
    renderer = fig.canvas.get_renderer()
    to_data = ax.transData.inverted()
    sides = {}
    for box, artist in artists.items():
        extent, pad = artist.get_window_extent(renderer), _PAD * artist.get_fontsize() / 72 * DPI  # the text, then the box's padding
        sides[box] = (to_data.transform((extent.x0 - pad, 0))[0], to_data.transform((extent.x1 + pad, 0))[0])
    line = dict(color="#444444", lw=0.9, shrinkA=2, shrinkB=0)
    for edge in edges:
        # input box -> waypoints -> the box it feeds; the arrow head on the last leg
        start, start_coords = (1, 0.5), artists[edge.source]
        for point in edge.waypoints:
            ax.annotate("", xy=at(point), xycoords="data", xytext=start, textcoords=start_coords, arrowprops=dict(arrowstyle="-", **line))
            start, start_coords = at(point), "data"
        ax.annotate("", xy=(0, 0.5), xycoords=artists[edge.target], xytext=start, textcoords=start_coords,
                    arrowprops=dict(arrowstyle="->", **{**line, "shrinkB": 2}))
        # the label on the arrow's first leg, nearer its input: the arrows into one box converge at its end
        (_, x0), y0 = sides[edge.source], edge.source.row
        if edge.waypoints:
            x1, y1 = at(edge.waypoints[0])
        else:
            (x1, _), y1 = sides[edge.target], edge.target.row
        ax.text(x0 + _LABEL_AT * (x1 - x0), y0 + _LABEL_AT * (y1 - y0), _edge_label(edge.node), ha="center", va="center", fontsize=6.5, color="#222222",
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"))
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"), "lineage picture", overwrite=overwrite)
    finally:
        plt.close(fig)
    return round(size[0] * DPI), round(size[1] * DPI)


def log_lineage_picture(version_uri: str) -> None:
    """Draw the lineage of the registered ``version_uri`` and log it as ``lineage.png`` to the active run."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="taskvec-lineage-") as tmp:
        path = Path(tmp) / PICTURE_NAME
        draw_lineage(lineage(version_uri), path)
        mlflow.log_artifact(str(path))
