"""``extract`` and ``compose`` as one library call each (``mlflow_taskvec.mlflow.workflows``),
what the CLI prints read from their result objects.

Local files, and a real sqlite store (conftest's ``registry``: digits-base, the rotate and flip
task vectors); expected values come from the in-memory models, not from the code under test.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from mlflow_helpers import BASE_NAME, COMPOSITE_SCALE, COMPOSITE_WEIGHTS, assert_same_state, composite_recipe, expected_composite_state, state_of
from safetensors.torch import load_file, save_file

from mlflow_taskvec.compose import Composed, Extracted
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.mlflow.workflows import ComposedAndRegistered, ExtractedAndRegistered, compose_recipe, extract_vector
from mlflow_taskvec.recipe import load_recipe, parse_recipe


def state_at(path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {n: ckpt.get_tensor(n) for n in ckpt.keys()}


def registered_line(client, name: str, version: str = "1") -> str:
    v = client.get_model_version(name, version)
    assert v.source.startswith("models:/m-")  # the logged model the version was made from
    return f"registered: models:/{name}/{version}  (model {v.source}, run {v.run_id})"


@pytest.fixture
def local_pair(tmp_path):
    """A base with a weight, a bias and an integer buffer only it has; a fine-tune of it."""
    base = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2), "steps": torch.tensor([3])}
    ft = {"w": base["w"] + 0.5, "b": torch.tensor([1.0, -1.0])}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_a_local_extract_reports_the_vector_it_wrote(local_pair, tmp_path):
    base, ft = local_pair
    out = tmp_path / "tv.safetensors"

    result = extract_vector(base, ft, out, task="t")

    assert isinstance(result, Extracted)
    written = load_file(str(out))
    assert torch.equal(written["w"], torch.full((2, 3), 0.5)) and torch.equal(written["b"], torch.tensor([1.0, -1.0]))
    assert (result.output, result.num_tensors, result.num_parameters, result.skipped, result.one_sided) == (out, 2, 8, 1, ["steps"])
    assert result.fingerprint == open_checkpoint(out).fingerprint()
    assert result.base_fingerprint == open_checkpoint(base).fingerprint()
    assert result.lines() == [
        f"task vector: {out}",
        "tensors: 2  parameters: 8  skipped: 1",
        "skipped, in one of the two only (integer or bool buffers): steps",
        f"base fingerprint: {result.base_fingerprint}",
        f"fingerprint: {result.fingerprint}",
    ]


def test_a_local_compose_reports_the_composite_it_wrote(local_pair, tmp_path):
    base, ft = local_pair
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"base": "base.safetensors", "scale": 0.5, "vectors": [{"finetuned": "ft.safetensors", "weight": 2.0}]}))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    out = tmp_path / "out.safetensors"

    result = compose_recipe(recipe, out)

    assert isinstance(result, Composed)
    written = load_file(str(out))
    assert torch.equal(written["w"], torch.arange(6.0).reshape(2, 3) + 0.5 * 2.0 * 0.5)
    assert torch.equal(written["b"], torch.tensor([1.0, -1.0]))
    lines = result.lines()
    assert lines[0] == f"composite: {out}"
    assert lines[1] == "method: task_arithmetic  scale: 0.5  weights: [2.0]  params: {}"
    assert lines[2].startswith("tensors: 3  parameters: 9  seconds: ")
    assert lines[3:] == [f"recipe sha256: {recipe.sha256()}", f"fingerprint: {open_checkpoint(out).fingerprint()}"]


def test_extract_with_register_resolves_mlflow_references_and_registers_what_it_wrote(registry, client, tmp_path):
    ft = registry.finetunes["rotate"]
    out = tmp_path / "rotate.safetensors"

    result = extract_vector(registry.base_uri, f"models:/{ft.model_id}", out, register_as="workflow-extracted", task="rotate")

    assert isinstance(result, ExtractedAndRegistered)
    independent = TaskVector.extract(state_of(registry.base_net), state_of(ft.net), task="rotate").save(tmp_path / "independent.safetensors")
    version = client.get_model_version("workflow-extracted", "1")
    assert result.extracted.fingerprint == independent == version.tags["taskvec.fingerprint"]
    assert version.tags["taskvec.base_uri"] == f"models:/{BASE_NAME}/1"
    assert version.tags["taskvec.finetuned_uri"] == f"models:/{ft.model_id}"
    assert result.lines() == [*result.extracted.lines(), registered_line(client, "workflow-extracted")]
    assert result.lines()[0] == f"task vector: {out}"


def test_extract_with_register_only_writes_no_file(registry, client, tmp_path):
    ft = registry.finetunes["flip"]

    result = extract_vector(registry.base_uri, f"models:/{ft.model_id}", register_as="workflow-registered-only")

    assert result.extracted is None and list(tmp_path.iterdir()) == []
    assert result.lines() == [registered_line(client, "workflow-registered-only")]


def test_compose_of_mlflow_references_records_them_and_writes_the_composite(registry, tmp_path):
    recipe = parse_recipe(composite_recipe())
    out = tmp_path / "composite"

    result = compose_recipe(recipe, out)

    assert isinstance(result, Composed)
    assert result.recipe.base == f"models:/{BASE_NAME}@current"  # as the recipe names it, not the download cache's path
    assert_same_state(state_at(out), expected_composite_state(registry), atol=1e-6)
    weights = [COMPOSITE_WEIGHTS["rotate"], COMPOSITE_WEIGHTS["flip"]]
    assert result.lines()[1] == f"method: task_arithmetic  scale: {COMPOSITE_SCALE}  weights: {weights}  params: {{}}"
    assert result.lines()[-1] == f"fingerprint: {open_checkpoint(out).fingerprint()}"


def test_compose_with_register_reports_the_version_and_the_composite_also_written(registry, client, tmp_path):
    recipe = parse_recipe(composite_recipe())
    out = tmp_path / "composite"

    result = compose_recipe(recipe, out, register_as="workflow-composite")

    assert isinstance(result, ComposedAndRegistered)
    fingerprint = client.get_model_version("workflow-composite", "1").tags["taskvec.fingerprint"]
    assert fingerprint == open_checkpoint(out).fingerprint()
    assert_same_state(state_at(out), expected_composite_state(registry), atol=1e-6)
    assert result.lines() == [
        f"method: task_arithmetic  scale: {COMPOSITE_SCALE}  weights: {[COMPOSITE_WEIGHTS['rotate'], COMPOSITE_WEIGHTS['flip']]}",
        f"fingerprint: {fingerprint}",
        f"composite: {out}",
        registered_line(client, "workflow-composite"),
    ]
