"""Verifying a registered composite or task vector end to end: untampered and reproducible."""

from __future__ import annotations

import glob
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.compose import compose_to, compose_to_adapter
from mlflow_taskvec.engine.adapter_merge import adapter_delta_fingerprint
from mlflow_taskvec.engine import metadata as meta_keys
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.compressed import compress
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.engine.coefficients import describe
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import flavor_conf as conf_keys
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow import uris
from mlflow_taskvec.mlflow.downloads import Resolved, resolve
from mlflow_taskvec.mlflow.inputs import Inputs
from mlflow_taskvec.mlflow.lineage import recorded_inputs
from mlflow_taskvec.recipe import load_recipe


@dataclass
class Verified:
    uri: str
    kind: str
    fingerprint: str
    checks: list[str]

    def lines(self, checks: bool = True) -> list[str]:
        """What ``verify`` prints for this version: one ``verified:`` line, then each check passed (with ``checks``)."""
        head = f"verified: {self.uri} ({self.kind}, fingerprint {self.fingerprint[:16]})"
        return [head, *(f"  ok  {check}" for check in self.checks if checks)]


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
    re-extraction gives ``taskvec.fingerprint``. Compressed task vector: stored weights, the
    source vector as its weights record, and compressing the source again gives
    ``taskvec.fingerprint``.
    """
    client = MlflowClient()
    mv = uris.get_version(ref, client)
    uri = f"models:/{mv.name}/{mv.version}"
    tags = dict(mv.tags or {})
    kind = tags.get(tag.KIND)
    if kind not in (tag.COMPOSITE, tag.TASK_VECTOR):
        raise TaskVecError(f"{uri}: not a composite or task vector registered by mlflow-taskvec (no taskvec.kind tag)")
    compressed = kind == tag.TASK_VECTOR and tag.COMPRESSED_FROM in tags
    required = [tag.FINGERPRINT, tag.BASE_FINGERPRINT]
    if compressed:
        required += [tag.COMPRESSED_FROM, tag.LAYOUT, tag.LAYOUT_PARAMS]
    else:
        required += [tag.BASE_URI] + ([tag.INPUTS, tag.RECIPE_SHA256] if kind == tag.COMPOSITE else [tag.FINETUNED_URI])
    for key in required:
        if not tags.get(key):
            raise TaskVecError(f"{uri}: the version has no {key} tag, so there is nothing to verify against")
    with tempfile.TemporaryDirectory(prefix="taskvec-verify-") as tmp:
        if kind == tag.COMPOSITE:
            checks = _verify_composite(client, mv, uri, tags, Path(tmp))
        elif compressed:
            checks = _verify_compressed(uri, tags, Path(tmp))
        else:
            checks = _verify_vector(uri, tags, Path(tmp))
    return Verified(uri, kind, tags[tag.FINGERPRINT], checks)


def verify_recursively(ref: str) -> list[Verified]:
    """``verify`` ``ref``, then every registered composite or task vector it is made of, depth
    first, down to the fine-tunes (each version once); raises TaskVecError at the first mismatch.

    A composite's own check covers its inputs' fingerprints, not what those inputs were made
    from: a task vector deep down whose weights were replaced together with its records is
    only found here.
    """
    client = MlflowClient()
    done: list[Verified] = []
    seen: set[str] = set()

    def visit(ref: str, stack: tuple[str, ...]) -> None:
        mv = uris.get_version(ref, client)
        uri = f"models:/{mv.name}/{mv.version}"
        if uri in stack:
            raise TaskVecError(f"{uri}: its lineage tags lead back to itself ({' -> '.join(stack + (uri,))})")
        if uri in seen:
            return
        seen.add(uri)
        done.append(verify(uri))
        for part in _registered_parts(client, dict(mv.tags or {})):
            visit(part, stack + (uri,))

    visit(ref, ())
    return done


def _registered_parts(client: MlflowClient, tags: dict) -> list[str]:
    """The registered composites and task vectors a version records as made of (base, inputs, fine-tune)."""
    refs = [tags.get(tag.BASE_URI), tags.get(tag.FINETUNED_URI)] + [str(row.get("uri")) for row in recorded_inputs(tags) or []]
    parts = []
    for ref in filter(None, refs):
        try:
            kind = (uris.get_version(ref, client).tags or {}).get(tag.KIND)
        except TaskVecError:  # a logged model, a run artifact or a path: checked by fingerprint above it
            continue
        if kind in (tag.COMPOSITE, tag.TASK_VECTOR):
            parts.append(ref)
    return parts


def _verify_composite(client: MlflowClient, mv: ModelVersion, uri: str, tags: dict, tmp: Path) -> list[str]:
    checks = []
    recorded_sha = tags[tag.RECIPE_SHA256]
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
    if [row.get("uri") for row in inputs] != [e.ref for e in recipe.vectors] or recipe.base != tags[tag.BASE_URI]:
        raise TaskVecError(f"{uri}: the taskvec.inputs / taskvec.base_uri tags name other models than its recipe.yaml (a tag was edited)")

    replaced = "the version was replaced or its artifact modified"
    base = _fetched_as_recorded(recipe.base, f"base {recipe.base}", tags[tag.BASE_FINGERPRINT], replaced, checks)
    resolved = []
    for i, (entry, row) in enumerate(zip(recipe.vectors, inputs)):
        what = f"input vectors[{i}] {entry.ref}"
        resolved.append(_fetched_as_recorded(entry.ref, what, str(row.get("fingerprint")), replaced, checks, f"{what} (weight {describe(entry.weight)})"))
    stored = _fetched_as_recorded(uri, f"stored weights of {uri}", tags[tag.FINGERPRINT], "the composite's artifact was modified", checks, "stored weights")

    inputs = Inputs(recipe, base, resolved)
    if recipe.output_format == "peft":  # a PEFT adapter as PEFT saved it: the same ranks, alphas and factors
        with inputs.named_as_references():
            compose_to_adapter(inputs.local(), output=tmp / "recomposed")
        again, stored_delta = adapter_delta_fingerprint(tmp / "recomposed"), adapter_delta_fingerprint(stored.path)
        _same("the recomposed adapter", again, stored_delta, "the recipe and inputs do not reproduce it")
        checks.append(f"recomposed from the recipe: adapter factors and config {again[:16]} as stored")
        return checks
    with inputs.named_as_references():
        result = compose_to(inputs.local(), output=tmp / "recomposed")
    _same("the recomposed model", result.fingerprint, tags[tag.FINGERPRINT], "the recipe and inputs do not reproduce it")
    checks.append(f"recomposed from the recipe: fingerprint {result.fingerprint[:16]} as recorded")
    return checks


def _verify_vector(uri: str, tags: dict, tmp: Path) -> list[str]:
    checks = []
    base_uri, ft_uri = tags[tag.BASE_URI], tags[tag.FINETUNED_URI]
    base = _fetched_as_recorded(base_uri, f"base {base_uri}", tags[tag.BASE_FINGERPRINT], "the version was replaced or its artifact modified", checks)
    stored = _fetched_as_recorded(uri, f"stored weights of {uri}", tags[tag.FINGERPRINT], "the task vector's artifact was modified", checks, "stored weights")
    ft = _fresh(ft_uri, f"fine-tune {ft_uri}")
    recorded_ft = (stored.conf or {}).get(conf_keys.FINETUNED_FINGERPRINT)
    if recorded_ft:
        _same(f"fine-tune {ft_uri}", ft.fingerprint, recorded_ft, "the fine-tune was replaced or its artifact modified")
    checks.append(f"fine-tune {ft_uri}: fingerprint {ft.fingerprint[:16]}" + (" as recorded" if recorded_ft else ""))
    stored_vector = TaskVector.load(stored.path)
    names = stored_vector.names
    # the same tensors (an --include/--exclude extraction) in the same storage dtype
    again = TaskVector.extract(base.path, ft.path, include=[glob.escape(n) for n in names], task=stored_vector.task, dtype=stored_vector.spec(names[0]).dtype)
    fingerprint = again.save(tmp / "reextracted.safetensors")
    _same("the re-extracted task vector", fingerprint, tags[tag.FINGERPRINT], "the base and fine-tune do not reproduce it")
    checks.append(f"re-extracted from base and fine-tune: fingerprint {fingerprint[:16]} as recorded")
    return checks


def _verify_compressed(uri: str, tags: dict, tmp: Path) -> list[str]:
    checks = []
    stored = _fetched_as_recorded(uri, f"stored weights of {uri}", tags[tag.FINGERPRINT], "the task vector's artifact was modified", checks, "stored weights")
    source_uri = tags[tag.COMPRESSED_FROM]
    recorded_source = open_checkpoint(stored.path).metadata().get(meta_keys.SOURCE_FINGERPRINT, "")
    source = _fetched_as_recorded(source_uri, f"source {source_uri}", recorded_source, "the source vector was replaced or its artifact modified", checks)
    try:
        settings = json.loads(tags[tag.LAYOUT_PARAMS])
    except json.JSONDecodeError:
        raise TaskVecError(f"{uri}: the {tag.LAYOUT_PARAMS} tag is not JSON (a tag was edited)") from None
    again = compress(TaskVector.load(source.path), tmp / "recompressed.safetensors", tags[tag.LAYOUT], source_fingerprint=source.fingerprint, **settings)
    _same("the recompressed task vector", again.fingerprint, tags[tag.FINGERPRINT], "the source and the layout do not reproduce it")
    checks.append(f"compressed again from the source ({tags[tag.LAYOUT]}): fingerprint {again.fingerprint[:16]} as recorded")
    return checks
