"""Lineage: what a registered version is made of, read from the ``taskvec.*`` tags of each
version (nothing is downloaded): composite -> inputs (recursively) -> task vectors ->
fine-tunes and base; rendered as a text tree, JSON or Graphviz dot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.engine.coefficients import Coefficient, check_coefficient, describe
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow import uris
from mlflow_taskvec.mlflow.approval import approvals_of
from mlflow_taskvec.references import is_local


@dataclass
class Node:
    """One model in a lineage tree, as the registry records it (nothing is downloaded)."""

    role: str  # composite, input, base, fine-tune (the root's role is its kind)
    uri: str
    kind: str  # composite, task_vector, model, logged model, run artifact, path, missing, cycle
    version: str | None = None
    weight: Coefficient | None = None  # a number, or tensor-name globs -> numbers
    fingerprint: str | None = None  # what the model records for itself, else what its parent recorded
    recorded: str | None = None  # what the parent recorded for this input
    task: str | None = None
    method: str | None = None
    scale: str | None = None
    run_id: str | None = None
    aliases: list[str] = field(default_factory=list)
    approvals: dict = field(default_factory=dict)
    problem: str | None = None  # missing version, cycle, fingerprint mismatch
    children: list["Node"] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "children" and v not in (None, [], {})}
        out["children"] = [c.to_dict() for c in self.children]
        return out


MAX_DEPTH = 32


def recorded_inputs(tags: dict) -> list[dict] | None:
    """A composite's ``taskvec.inputs`` rows, or None when the tag is not a JSON list of objects."""
    try:
        rows = json.loads(tags.get(tag.INPUTS, "[]"))
    except json.JSONDecodeError:
        return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return rows


def lineage(ref: str) -> Node:
    """The lineage tree of a registered version: composite -> inputs (recursively) -> task
    vectors -> fine-tunes and base, from the ``taskvec.*`` tags of each version."""
    client = MlflowClient()
    mv = uris.get_version(ref, client)  # the root must exist: a clear error otherwise
    root = _walk(client, f"models:/{mv.name}/{mv.version}", role="", weight=None, recorded=None, stack=())
    root.role = root.kind
    return root


def _walk(client: MlflowClient, uri: str, role: str, weight, recorded: str | None, stack: tuple) -> Node:
    node = Node(role=role, uri=uri, kind="model", weight=weight, recorded=recorded, fingerprint=recorded)
    if uri in stack:
        node.kind, node.problem = "cycle", "cycle: already above in this lineage"
        return node
    if len(stack) >= MAX_DEPTH:
        node.problem = f"not followed: deeper than {MAX_DEPTH} levels"
        return node
    tags: dict = {}
    if is_local(uri):
        node.kind = "path"
        if not Path(uri).exists():
            node.kind, node.problem = "missing", "missing: no such file or directory here"
        return node
    try:
        parsed = uris.parse(uri)
    except TaskVecError as exc:
        node.kind, node.problem = "missing", f"missing: {str(exc).removeprefix(f'{uri}: ')}"
        return node
    if parsed.kind == "run":
        node.kind, node.run_id = "run artifact", parsed.run_id
        try:
            client.get_run(node.run_id)
        except MlflowException:
            node.kind, node.problem = "missing", f"missing: run {node.run_id} not found"
        return node
    try:
        if parsed.kind == "model_id":
            lm = client.get_logged_model(parsed.model_id)
            node.kind, node.run_id, tags = "logged model", lm.source_run_id, dict(lm.tags or {})
        else:
            mv = uris.get_version(uri, client)
            node.version, node.run_id, tags = str(mv.version), mv.run_id, dict(mv.tags or {})
            node.aliases = sorted(mv.aliases or [])
            node.approvals = {a: v for a, v in approvals_of(tags).items() if a in node.aliases}
    except (MlflowException, TaskVecError) as exc:
        node.kind, node.problem = "missing", f"missing: {str(exc).splitlines()[0].removeprefix(f'{uri}: ')}"
        return node

    kind = tags.get(tag.KIND)
    if kind:
        node.kind = kind if node.kind != "logged model" else f"logged {kind}"
    own = tags.get(tag.FINGERPRINT)
    if own:
        node.fingerprint = own
        if recorded and own != recorded:
            node.problem = f"fingerprint differs: recorded {recorded[:16]} by its parent, {own[:16]} on this version now"
    node.task = tags.get(tag.TASK) or None
    node.method = tags.get(tag.METHOD)
    node.scale = tags.get(tag.SCALE)
    below = stack + (uri,)
    if kind == tag.COMPOSITE:
        if tags.get(tag.BASE_URI):
            node.children.append(_walk(client, tags[tag.BASE_URI], "base", None, tags.get(tag.BASE_FINGERPRINT), below))
        inputs = recorded_inputs(tags)
        if inputs is None:
            inputs, node.problem = [], "unreadable taskvec.inputs tag"
        for row in inputs:
            weight = _recorded_weight(row.get("weight"))
            fingerprint = row.get("fingerprint") if isinstance(row.get("fingerprint"), str) else None
            node.children.append(_walk(client, str(row.get("uri")), "input", weight, fingerprint, below))
    elif kind == tag.TASK_VECTOR and tags.get(tag.COMPRESSED_FROM):  # its source carries base and fine-tune
        source = _walk(client, tags[tag.COMPRESSED_FROM], "compressed from", None, tags.get(tag.SOURCE_FINGERPRINT), below)
        node.children.append(source)
    elif kind == tag.TASK_VECTOR:
        if tags.get(tag.BASE_URI):
            node.children.append(_walk(client, tags[tag.BASE_URI], "base", None, tags.get(tag.BASE_FINGERPRINT), below))
        if tags.get(tag.FINETUNED_URI):
            node.children.append(_walk(client, tags[tag.FINETUNED_URI], "fine-tune", None, None, below))
    return node


def _recorded_weight(value) -> Coefficient | None:
    """An input's recorded weight: a number or a per-layer mapping; None when the tag holds anything else."""
    try:
        return check_coefficient(value, "weight")
    except TaskVecError:
        return None


def _describe(node: Node) -> str:
    parts = [f"{node.role}: {node.uri}" if node.role != node.kind else node.uri, f"[{node.kind}]"]
    if node.method:
        parts.append(f"method {node.method}" + (f" scale {node.scale}" if node.scale else ""))
    if node.task:
        parts.append(f"task {node.task}")
    if node.weight is not None:
        parts.append(f"weight {describe(node.weight)}")
    if node.fingerprint:
        parts.append(f"fp {node.fingerprint[:16]}")
    if node.run_id and node.role in ("fine-tune", node.kind):
        parts.append(f"run {node.run_id}")
    if node.aliases:
        parts.append("@" + ",@".join(node.aliases))
    for alias, info in sorted(node.approvals.items()):
        parts.append(f"{alias} by {info.get('by', '?')} at {info.get('at', '?')}")
    if node.problem:
        parts.append(f"!! {node.problem}")
    return "  ".join(parts)


def render_text(root: Node) -> str:
    lines = [_describe(root)]

    def add(node: Node, prefix: str) -> None:
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            lines.append(prefix + ("└── " if last else "├── ") + _describe(child))
            add(child, prefix + ("    " if last else "│   "))

    add(root, "")
    return "\n".join(lines)


def render_json(root: Node) -> str:
    return json.dumps(root.to_dict(), indent=2)


def render_dot(root: Node) -> str:
    """Graphviz ``dot`` text: one node per model (shared ones once), edges from input to result."""
    ids: dict[str, str] = {}
    nodes: list[str] = []
    edges: list[str] = []

    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def visit(node: Node) -> str:
        key = node.uri
        if key in ids:
            return ids[key]
        ids[key] = f"n{len(ids)}"
        label = [node.uri, node.kind + (f" {node.task}" if node.task else "") + (f" {node.method}" if node.method else "")]
        if node.fingerprint:
            label.append(f"fp {node.fingerprint[:16]}")
        if node.aliases:
            label.append("@" + ",@".join(node.aliases))
        style = ', style=dashed, color=red' if node.kind in ("missing", "cycle") or node.problem else ""
        shape = "box3d" if node.kind == "composite" else "box"
        nodes.append(f"  {ids[key]} [label={quote(chr(10).join(label))}, shape={shape}{style}];")
        for child in node.children:
            child_id = visit(child)
            edge = child.role + (f" {describe(child.weight)}" if child.weight is not None else "")
            edges.append(f"  {child_id} -> {ids[key]} [label={quote(edge)}];")
        return ids[key]

    visit(root)
    return "\n".join(["digraph lineage {", "  rankdir=LR;", "  node [fontname=monospace];", *nodes, *edges, "}"])
