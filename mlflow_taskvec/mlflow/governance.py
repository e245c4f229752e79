"""Governance: approving versions, requiring approval, reading lineage, verifying versions.

Everything goes through the MLflow client API, so it works the same on the
embedded sqlite store and against a tracking server.

Approval is an alias plus version tags. ``approve(models:/name/3, "approved")``
points the alias ``approved`` at version 3 and writes on that version:

- ``taskvec.approval.<alias>.by``: who (``MLFLOW_TRACKING_USERNAME``, else the OS user)
- ``taskvec.approval.<alias>.at``: when (UTC, ISO-8601, e.g. ``2026-11-28T12:00:00Z``)
- ``taskvec.approval.<alias>.note``: the optional note
- ``taskvec.approved_by`` / ``taskvec.approved_at``: the latest approval of the version, any alias

A recipe's ``policy: {require_alias: approved}`` (or ``compose --require-alias``)
refuses an input unless the registered version it resolves to carries the alias
*now*; the tags say who put it there and when.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.engine.coefficients import describe
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.recipe import Recipe, load_recipe, run_recipe
from mlflow_taskvec.mlflow.downloads import Resolved, _mlflow_error, resolve

_MODEL_ID = re.compile(r"^m-[0-9a-f]{8,}$")
APPROVAL_PREFIX = "taskvec.approval."


# -- registered versions -----------------------------------------------------------------


def parse_version_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/name/version`` -> (name, version, None); ``models:/name@alias`` -> (name, None, alias).

    Anything else (a local path, ``runs:/``, ``models:/<model_id>``) is not a registered version.
    """
    if not ref.startswith("models:/"):
        raise TaskVecError(f"{ref}: not a registered model version (use models:/name/version or models:/name@alias)")
    rest = ref[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version:
            return name, version, None
    elif _MODEL_ID.match(rest):
        raise TaskVecError(f"{ref}: a logged model, not a registered model version (use models:/name/version or models:/name@alias)")
    raise TaskVecError(f"{ref}: not a registered model version (use models:/name/version or models:/name@alias)")


def get_version(ref: str, client: MlflowClient | None = None) -> ModelVersion:
    """The registered model version ``ref`` names (an alias resolved to its version now)."""
    name, version, alias = parse_version_ref(ref)
    client = client or MlflowClient()
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise _mlflow_error(ref, exc) from None


# -- policy -----------------------------------------------------------------------------------


def enforce_policy(recipe: Recipe, require_alias: str) -> None:
    """Refuse the first input of ``recipe`` whose registered version does not carry ``require_alias``.

    Reads the registry only: nothing is downloaded, so a refusal is quick.
    """
    if not require_alias or not require_alias.strip():
        raise TaskVecError("require_alias: an alias name cannot be empty")
    client = None  # made on first use: a refusal of a local input touches no store
    for i, entry in enumerate(recipe.vectors):
        ref = entry.ref
        what = f"vectors[{i}] ({ref})"
        if not ref.startswith("models:/"):
            raise TaskVecError(f"{what}: not a registered model version, so it cannot carry the alias {require_alias!r} the policy requires")
        client = client or MlflowClient()
        try:
            mv = get_version(ref, client)
        except TaskVecError as exc:
            raise TaskVecError(f"vectors[{i}]: {exc}") from None
        if require_alias not in (mv.aliases or []):
            raise TaskVecError(
                f"{what}: version {mv.version} of {mv.name!r} does not carry the alias {require_alias!r} the policy requires "
                f"(approve it with: mlflow-taskvec approve models:/{mv.name}/{mv.version} --alias {require_alias})"
            )


# -- approval ---------------------------------------------------------------------------------


def current_user() -> str:
    """Who is acting: the MLflow user (``MLFLOW_TRACKING_USERNAME``), else the OS user."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        return "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Approval:
    name: str
    version: str
    alias: str
    by: str
    at: str
    note: str | None = None

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def approval_tags(alias: str, by: str, at: str, note: str | None) -> dict[str, str]:
    tags = {f"{APPROVAL_PREFIX}{alias}.by": by, f"{APPROVAL_PREFIX}{alias}.at": at, "taskvec.approved_by": by, "taskvec.approved_at": at}
    if note:
        tags[f"{APPROVAL_PREFIX}{alias}.note"] = note
    return tags


def approvals_of(tags: dict) -> dict[str, dict[str, str]]:
    """``{alias: {"by": ..., "at": ..., "note": ...}}`` from a version's tags."""
    out: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith(APPROVAL_PREFIX):
            alias, _, part = key[len(APPROVAL_PREFIX) :].rpartition(".")
            if alias:
                out.setdefault(alias, {})[part] = value
    return out


def approve(ref: str, alias: str, note: str | None = None) -> Approval:
    """Point ``alias`` at the version ``ref`` names and record who approved it, when, and why.

    The alias is set first (MLflow validates its name); if the tags then cannot be
    written, the alias goes back to where it was, so no approval is half-recorded.
    """
    if not alias or not alias.strip():
        raise TaskVecError("--alias: an alias name cannot be empty")
    parse_version_ref(ref)  # refuse what is not a registry reference before connecting to the store
    client = MlflowClient()
    mv = get_version(ref, client)
    name, version = mv.name, str(mv.version)
    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    by, at = current_user(), utc_now()
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise _mlflow_error(f"{ref}: alias {alias!r}", exc) from None
    try:
        for key, value in approval_tags(alias, by, at, note).items():
            client.set_model_version_tag(name, version, key, value)
        if not note and f"{APPROVAL_PREFIX}{alias}.note" in (mv.tags or {}):
            client.delete_model_version_tag(name, version, f"{APPROVAL_PREFIX}{alias}.note")  # an older approval's note
    except MlflowException as exc:
        try:
            if previous is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, previous)
        except MlflowException:
            pass
        raise _mlflow_error(f"{ref}: recording the approval", exc) from None
    return Approval(name, version, alias, by, at, note or None)


# -- lineage ----------------------------------------------------------------------------------


@dataclass
class Node:
    """One model in a lineage tree, as the registry records it (nothing is downloaded)."""

    role: str  # composite, input, base, fine-tune (the root's role is its kind)
    uri: str
    kind: str  # composite, task_vector, model, logged model, run artifact, path, missing, cycle
    version: str | None = None
    weight: float | None = None
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
        rows = json.loads(tags.get("taskvec.inputs", "[]"))
    except json.JSONDecodeError:
        return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return rows


def lineage(ref: str) -> Node:
    """The lineage tree of a registered version: composite -> inputs (recursively) -> task
    vectors -> fine-tunes and base, from the ``taskvec.*`` tags of each version."""
    client = MlflowClient()
    mv = get_version(ref, client)  # the root must exist: a clear error otherwise
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
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
        try:
            if _MODEL_ID.match(rest):
                lm = client.get_logged_model(rest)
                node.kind, node.run_id, tags = "logged model", lm.source_run_id, dict(lm.tags or {})
            else:
                mv = get_version(uri, client)
                node.version, node.run_id, tags = str(mv.version), mv.run_id, dict(mv.tags or {})
                node.aliases = sorted(mv.aliases or [])
                node.approvals = {a: v for a, v in approvals_of(tags).items() if a in node.aliases}
        except (MlflowException, TaskVecError) as exc:
            node.kind, node.problem = "missing", f"missing: {str(exc).splitlines()[0].removeprefix(f'{uri}: ')}"
            return node
    elif uri.startswith("runs:/"):
        node.kind, node.run_id = "run artifact", uri[len("runs:/") :].partition("/")[0]
        try:
            client.get_run(node.run_id)
        except MlflowException:
            node.kind, node.problem = "missing", f"missing: run {node.run_id} not found"
        return node
    else:
        node.kind = "path"
        if not Path(uri).exists():
            node.kind, node.problem = "missing", "missing: no such file or directory here"
        return node

    kind = tags.get("taskvec.kind")
    if kind:
        node.kind = kind if node.kind != "logged model" else f"logged {kind}"
    own = tags.get("taskvec.fingerprint")
    if own:
        node.fingerprint = own
        if recorded and own != recorded:
            node.problem = f"fingerprint differs: recorded {recorded[:16]} by its parent, {own[:16]} on this version now"
    node.task = tags.get("taskvec.task") or None
    node.method = tags.get("taskvec.method")
    node.scale = tags.get("taskvec.scale")
    below = stack + (uri,)
    if kind == "composite":
        if tags.get("taskvec.base_uri"):
            node.children.append(_walk(client, tags["taskvec.base_uri"], "base", None, tags.get("taskvec.base_fingerprint"), below))
        inputs = recorded_inputs(tags)
        if inputs is None:
            inputs, node.problem = [], "unreadable taskvec.inputs tag"
        for row in inputs:
            weight = row.get("weight")
            weight = float(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) else None
            fingerprint = row.get("fingerprint") if isinstance(row.get("fingerprint"), str) else None
            node.children.append(_walk(client, str(row.get("uri")), "input", weight, fingerprint, below))
    elif kind == "task_vector":
        if tags.get("taskvec.base_uri"):
            node.children.append(_walk(client, tags["taskvec.base_uri"], "base", None, tags.get("taskvec.base_fingerprint"), below))
        if tags.get("taskvec.finetuned_uri"):
            node.children.append(_walk(client, tags["taskvec.finetuned_uri"], "fine-tune", None, None, below))
    return node


def _describe(node: Node) -> str:
    parts = [f"{node.role}: {node.uri}" if node.role != node.kind else node.uri, f"[{node.kind}]"]
    if node.method:
        parts.append(f"method {node.method}" + (f" scale {node.scale}" if node.scale else ""))
    if node.task:
        parts.append(f"task {node.task}")
    if node.weight is not None:
        parts.append(f"weight {node.weight:g}")
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
            edge = child.role + (f" {child.weight:g}" if child.weight is not None else "")
            edges.append(f"  {child_id} -> {ids[key]} [label={quote(edge)}];")
        return ids[key]

    visit(root)
    return "\n".join(["digraph lineage {", "  rankdir=LR;", "  node [fontname=monospace];", *nodes, *edges, "}"])


# -- verification -----------------------------------------------------------------------------


@dataclass
class Verified:
    uri: str
    kind: str
    fingerprint: str
    checks: list[str]


def _fresh(ref: str, what: str) -> Resolved:
    """Download ``ref`` again (never from the cache) and check it against what it records."""
    try:
        return resolve(ref, fresh=True)
    except TaskVecError as exc:
        raise TaskVecError(f"{what}: {str(exc).removeprefix(f'{ref}: ')}") from None


def _same(what: str, got: str, recorded: str, hint: str) -> None:
    if got != recorded:
        raise TaskVecError(f"{what} has fingerprint {got[:16]}, the version records {recorded[:16]} ({hint})")


def _fetched_as_recorded(ref: str, what: str, recorded: str, hint: str, checks: list[str], label: str | None = None) -> Resolved:
    """Download ``ref`` afresh, require the fingerprint the version recorded, and note the check."""
    res = _fresh(ref, what)
    _same(what, res.fingerprint, recorded, hint)
    checks.append(f"{label or what}: fingerprint {res.fingerprint[:16]} as recorded")
    return res


def verify(ref: str) -> Verified:
    """Check a registered composite or task vector end to end; raises TaskVecError at the first mismatch.

    Composite: the logged ``recipe.yaml`` hashes to ``taskvec.recipe_sha256``; the base and
    every input, downloaded afresh, have the fingerprints the version records; the stored
    weights have ``taskvec.fingerprint``; recomposing the recipe from those inputs gives
    that fingerprint again. Task vector: base and fine-tune as recorded, stored weights, and
    re-extraction gives ``taskvec.fingerprint``.
    """
    client = MlflowClient()
    mv = get_version(ref, client)
    uri = f"models:/{mv.name}/{mv.version}"
    tags = dict(mv.tags or {})
    kind = tags.get("taskvec.kind")
    if kind not in ("composite", "task_vector"):
        raise TaskVecError(f"{uri}: not a composite or task vector registered by mlflow-taskvec (no taskvec.kind tag)")
    required = ["taskvec.fingerprint", "taskvec.base_uri", "taskvec.base_fingerprint"]
    required += ["taskvec.inputs", "taskvec.recipe_sha256"] if kind == "composite" else ["taskvec.finetuned_uri"]
    for key in required:
        if not tags.get(key):
            raise TaskVecError(f"{uri}: the version has no {key} tag, so there is nothing to verify against")
    with tempfile.TemporaryDirectory(prefix="taskvec-verify-") as tmp:
        if kind == "composite":
            checks = _verify_composite(client, mv, uri, tags, Path(tmp))
        else:
            checks = _verify_vector(uri, tags, Path(tmp))
    return Verified(uri, kind, tags["taskvec.fingerprint"], checks)


def _verify_composite(client: MlflowClient, mv: ModelVersion, uri: str, tags: dict, tmp: Path) -> list[str]:
    checks = []
    recorded_sha = tags["taskvec.recipe_sha256"]
    if not mv.run_id:
        raise TaskVecError(f"{uri}: the version names no run, so its recipe.yaml cannot be found")
    try:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="recipe.yaml", dst_path=str(tmp / "recipe"))
    except (MlflowException, OSError):
        raise TaskVecError(f"{uri}: run {mv.run_id} has no recipe.yaml artifact to recompose from") from None
    recipe = load_recipe(local)
    if recipe.sha256() != recorded_sha:
        raise TaskVecError(
            f"recipe.yaml of run {mv.run_id} has sha256 {recipe.sha256()[:16]}, the version records {recorded_sha[:16]} (the recipe was edited)"
        )
    checks.append(f"recipe.yaml: sha256 {recorded_sha[:16]} as recorded")
    inputs = recorded_inputs(tags)
    if inputs is None:
        raise TaskVecError(f"{uri}: the taskvec.inputs tag is not a JSON list of inputs (a tag was edited)")
    if [row.get("uri") for row in inputs] != [e.ref for e in recipe.vectors] or recipe.base != tags["taskvec.base_uri"]:
        raise TaskVecError(f"{uri}: the taskvec.inputs / taskvec.base_uri tags name other models than its recipe.yaml (a tag was edited)")

    replaced = "the version was replaced or its artifact modified"
    base = _fetched_as_recorded(recipe.base, f"base {recipe.base}", tags["taskvec.base_fingerprint"], replaced, checks)
    resolved = []
    for i, (entry, row) in enumerate(zip(recipe.vectors, inputs)):
        what = f"input vectors[{i}] {entry.ref}"
        resolved.append(_fetched_as_recorded(entry.ref, what, str(row.get("fingerprint")), replaced, checks, f"{what} (weight {describe(entry.weight) if isinstance(entry.weight, dict) else format(entry.weight, 'g')})"))
    _fetched_as_recorded(uri, f"stored weights of {uri}", tags["taskvec.fingerprint"], "the composite's artifact was modified", checks, "stored weights")

    from mlflow_taskvec.mlflow.registry import local_recipe

    result = run_recipe(local_recipe(recipe, base, resolved), output=tmp / "recomposed")
    _same("the recomposed model", result.fingerprint, tags["taskvec.fingerprint"], "the recipe and inputs do not reproduce it")
    checks.append(f"recomposed from the recipe: fingerprint {result.fingerprint[:16]} as recorded")
    return checks


def _verify_vector(uri: str, tags: dict, tmp: Path) -> list[str]:
    checks = []
    base_uri, ft_uri = tags["taskvec.base_uri"], tags["taskvec.finetuned_uri"]
    base = _fetched_as_recorded(base_uri, f"base {base_uri}", tags["taskvec.base_fingerprint"], "the version was replaced or its artifact modified", checks)
    stored = _fetched_as_recorded(uri, f"stored weights of {uri}", tags["taskvec.fingerprint"], "the task vector's artifact was modified", checks, "stored weights")
    ft = _fresh(ft_uri, f"fine-tune {ft_uri}")
    recorded_ft = (stored.conf or {}).get("finetuned_fingerprint")
    if recorded_ft:
        _same(f"fine-tune {ft_uri}", ft.fingerprint, recorded_ft, "the fine-tune was replaced or its artifact modified")
    checks.append(f"fine-tune {ft_uri}: fingerprint {ft.fingerprint[:16]}" + (" as recorded" if recorded_ft else ""))
    stored_vector = TaskVector.load(stored.path)
    names = stored_vector.names
    # the same tensors (an --include/--exclude extraction) in the same storage dtype
    again = TaskVector.extract(base.path, ft.path, include=[glob.escape(n) for n in names], task=stored_vector.task, dtype=stored_vector.spec(names[0]).dtype)
    fingerprint = again.save(tmp / "reextracted.safetensors")
    _same("the re-extracted task vector", fingerprint, tags["taskvec.fingerprint"], "the base and fine-tune do not reproduce it")
    checks.append(f"re-extracted from base and fine-tune: fingerprint {fingerprint[:16]} as recorded")
    return checks
