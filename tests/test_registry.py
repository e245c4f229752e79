"""Registering task vectors and composites with their lineage, and resolving MLflow references.

One small registry per module (conftest's ``registry`` fixture, made by
``build_registry``: digits-base version 1 with alias ``current``, a fine-tune per
task logged in its own run, ``digits-{rotate,flip}-vector`` version 1 with alias
``current``, and ``digits-composite`` version 1 made from ``rotate@current`` and
``flip/1``) is shared by the read-only tests; tests that register more use names
of their own. Every expected value is computed
independently from the in-memory models. MLflow runs on a real sqlite store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow_helpers import (
    count_hashing,
    BASE_NAME,
    COMPOSITE_NAME,
    COMPOSITE_SCALE,
    COMPOSITE_WEIGHTS,
    CODE_PATHS,
    FACTORY,
    FACTORY_KWARGS,
    TASKVEC_COMPOSITE_TAGS,
    TASKVEC_VECTOR_TAGS,
    assert_same_state,
    composite_recipe,
    digits_tasks,
    expected_composite_state,
    state_of,
    vector_name,
)

from mlflow_taskvec import TaskVecError
from mlflow_taskvec.mlflow import flavor
from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.engine import checkpoint
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.compose import compose_to
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.recipe import load_recipe, parse_recipe
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.inputs import resolve_inputs
from mlflow_taskvec.mlflow.registry import register_composite


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty download cache of this test's own."""
    monkeypatch.setenv("MLFLOW_TASKVEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def taskvec_tags(tags: dict) -> dict:
    return {k: v for k, v in tags.items() if k.startswith("taskvec.")}


def independent_vector(registry, task: str, tmp_path: Path) -> tuple[str, float]:
    """(fingerprint, L2 norm) of fine-tune minus base, from the in-memory models."""
    base, ft = state_of(registry.base_net), state_of(registry.finetunes[task].net)
    fingerprint = TaskVector.extract(base, ft, task=task).save(tmp_path / f"{task}.safetensors")
    norm = math.sqrt(sum(float(((ft[n].double() - base[n].double()) ** 2).sum()) for n in base))
    return fingerprint, norm


def fingerprint_of_version(name: str, version: str = "1") -> str:
    return mlflow.tracking.MlflowClient().get_model_version(name, version).tags["taskvec.fingerprint"]


# -- task vectors ------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["rotate", "flip"])
def test_a_registered_task_vector_carries_every_lineage_tag(registry, client, tmp_path, task):
    version = client.get_model_version(vector_name(task), "1")
    fingerprint, norm = independent_vector(registry, task, tmp_path)
    tags = taskvec_tags(version.tags)

    assert set(tags) == TASKVEC_VECTOR_TAGS
    assert tags["taskvec.kind"] == "task_vector"
    assert tags["taskvec.task"] == task
    assert tags["taskvec.base_uri"] == f"models:/{BASE_NAME}/1"
    assert tags["taskvec.base_fingerprint"] == open_checkpoint(state_of(registry.base_net)).fingerprint()
    assert tags["taskvec.finetuned_uri"] == f"models:/{registry.finetunes[task].model_id}"
    assert tags["taskvec.fingerprint"] == fingerprint
    assert tags["taskvec.num_parameters"] == str(sum(p.numel() for p in registry.base_net.parameters())) == "2145"  # encoder 64x16+16 + 16x16+16, heads 49 classes x (16+1)
    assert float(tags["taskvec.l2_norm"]) == pytest.approx(norm, rel=1e-5)


def test_a_task_vectors_logged_model_carries_the_same_tags(registry, client):
    reg = registry.vectors["rotate"]

    logged = client.get_logged_model(reg.model_id)

    assert taskvec_tags(logged.tags) == taskvec_tags(client.get_model_version(vector_name("rotate"), "1").tags)


def test_a_task_vector_is_logged_in_the_fine_tunes_run(registry, client):
    for task, ft in registry.finetunes.items():
        reg = registry.vectors[task]
        assert client.get_logged_model(reg.model_id).source_run_id == ft.run_id
        assert client.get_model_version(vector_name(task), "1").run_id == ft.run_id
        assert reg.run_id == ft.run_id


def test_a_task_vector_version_points_its_alias_and_loads_as_the_vector(registry, client, tmp_path):
    assert str(client.get_model_version_by_alias(vector_name("rotate"), "current").version) == "1"

    loaded = flavor.load_model(f"models:/{vector_name('rotate')}@current")

    base, ft = state_of(registry.base_net), state_of(registry.finetunes["rotate"].net)
    for name in loaded.names:
        torch.testing.assert_close(loaded.get_tensor(name), ft[name] - base[name], atol=0, rtol=0)


def test_a_task_vector_description_tabulates_base_fine_tune_and_vector(registry, client):
    text = client.get_model_version(vector_name("rotate"), "1").description
    tags = registry.vectors["rotate"].tags

    assert text.startswith("**Task vector** for task `rotate`")
    assert "| role | reference | fingerprint |" in text
    assert f"| base | [`models:/{BASE_NAME}/1`](#/models/{BASE_NAME}/versions/1) | `{tags['taskvec.base_fingerprint'][:16]}` |" in text
    assert f"| fine-tune | `models:/{registry.finetunes['rotate'].model_id}` |" in text
    assert f"| task vector | this version | `{tags['taskvec.fingerprint'][:16]}` |" in text


# -- composites --------------------------------------------------------------------------


def test_a_registered_composite_carries_every_lineage_tag(registry, client):
    tags = taskvec_tags(client.get_model_version(COMPOSITE_NAME, "1").tags)
    composite = flavor.load_model(f"models:/{COMPOSITE_NAME}/1")

    assert set(tags) == TASKVEC_COMPOSITE_TAGS
    assert tags["taskvec.kind"] == "composite"
    assert tags["taskvec.method"] == "task_arithmetic"
    assert float(tags["taskvec.scale"]) == COMPOSITE_SCALE
    assert json.loads(tags["taskvec.params"]) == {}
    assert tags["taskvec.base_uri"] == f"models:/{BASE_NAME}/1"
    assert tags["taskvec.base_fingerprint"] == open_checkpoint(state_of(registry.base_net)).fingerprint()
    assert tags["taskvec.fingerprint"] == open_checkpoint(state_of(composite)).fingerprint()


def test_composite_inputs_record_aliases_resolved_to_versions_with_weights_and_fingerprints(registry, client):
    tags = client.get_model_version(COMPOSITE_NAME, "1").tags

    inputs = json.loads(tags["taskvec.inputs"])

    # the recipe named rotate by alias (@current) and flip by version
    assert inputs == [
        {"uri": f"models:/{vector_name('rotate')}/1", "weight": 1.0, "fingerprint": fingerprint_of_version(vector_name("rotate"))},
        {"uri": f"models:/{vector_name('flip')}/1", "weight": -0.5, "fingerprint": fingerprint_of_version(vector_name("flip"))},
    ]


def test_the_composite_run_logs_params_and_the_resolved_recipe(registry, client, tmp_path):
    run = client.get_run(registry.composite.run_id)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="recipe.yaml", dst_path=str(tmp_path)))
    recipe = yaml.safe_load(local.read_text("utf-8"))

    assert run.data.params["method"] == "task_arithmetic"
    assert float(run.data.params["scale"]) == COMPOSITE_SCALE
    assert float(run.data.params["vectors.0.weight"]) == 1.0
    assert float(run.data.params["vectors.1.weight"]) == -0.5
    assert run.data.params["vectors.0.uri"] == f"models:/{vector_name('rotate')}/1"
    assert recipe["base"] == f"models:/{BASE_NAME}/1"
    assert [v["vector"] for v in recipe["vectors"]] == [f"models:/{vector_name('rotate')}/1", f"models:/{vector_name('flip')}/1"]
    assert [v["weight"] for v in recipe["vectors"]] == [1.0, -0.5]
    assert client.get_model_version(COMPOSITE_NAME, "1").tags["taskvec.recipe_sha256"] == load_recipe(local).sha256()


def test_the_composite_is_logged_in_its_run_and_versioned_from_its_logged_model(registry, client):
    version = client.get_model_version(COMPOSITE_NAME, "1")

    assert version.run_id == registry.composite.run_id
    assert version.source == registry.composite.model_uri == f"models:/{registry.composite.model_id}"
    assert client.get_logged_model(registry.composite.model_id).source_run_id == registry.composite.run_id
    assert str(client.get_model_version_by_alias(COMPOSITE_NAME, "champion").version) == "1"


def test_the_composite_description_is_a_markdown_lineage_table(registry, client):
    text = client.get_model_version(COMPOSITE_NAME, "1").description
    fp = {task: fingerprint_of_version(vector_name(task))[:16] for task in ("rotate", "flip")}

    assert text.startswith("**Composite** by `task_arithmetic`, scale 0.7.")
    assert "| role | model | version | weight | fingerprint |" in text
    assert f"| base | [`{BASE_NAME}`](#/models/{BASE_NAME}/versions/1) | 1 | - |" in text
    assert f"| task vector | [`{vector_name('rotate')}`](#/models/{vector_name('rotate')}/versions/1) | 1 | 1 | `{fp['rotate']}` |" in text
    assert f"| task vector | [`{vector_name('flip')}`](#/models/{vector_name('flip')}/versions/1) | 1 | -0.5 | `{fp['flip']}` |" in text


def test_composite_weights_equal_base_plus_scale_times_the_weighted_sum_of_vectors(registry):
    composite = flavor.load_model(f"models:/{COMPOSITE_NAME}/1")

    assert_same_state(state_of(composite), expected_composite_state(registry), atol=1e-6)


@pytest.fixture(scope="module")
def ties_composite(registry):
    recipe = {**composite_recipe(), "method": "ties", "scale": 0.6, "params": {"density": 0.5}}
    return register_composite(parse_recipe(recipe), "digits-ties")


def test_a_composite_records_its_methods_params_in_tags_and_run_params(ties_composite, client):
    version = client.get_model_version("digits-ties", "1")
    run = client.get_run(ties_composite.run_id)

    assert version.tags["taskvec.method"] == "ties"
    assert json.loads(version.tags["taskvec.params"]) == {"density": 0.5}
    assert run.data.params["method"] == "ties"
    assert float(run.data.params["params.density"]) == 0.5
    assert "params `{\"density\": 0.5}`" in version.description


def test_a_different_recipe_gives_a_different_recipe_digest_and_fingerprint(ties_composite, client):
    ties, plain = client.get_model_version("digits-ties", "1").tags, client.get_model_version(COMPOSITE_NAME, "1").tags

    assert ties["taskvec.recipe_sha256"] != plain["taskvec.recipe_sha256"]
    assert ties["taskvec.fingerprint"] != plain["taskvec.fingerprint"]
    assert ties["taskvec.inputs"] == plain["taskvec.inputs"]


# -- evaluation ----------------------------------------------------------------------------


def _recipe_with_evaluation(tasks: list[str]) -> dict:
    return {**composite_recipe(), "evaluation": {"evaluator": "digits_tasks:evaluate", "tasks": tasks, "control_tasks": ["digits"]}}


def test_an_evaluation_block_logs_metrics_on_the_run_and_the_logged_model(registry, client):
    reg = register_composite(parse_recipe(_recipe_with_evaluation(["rotate", "flip"])), "digits-evaluated")
    model = flavor.load_model(reg.version_uri)
    base, rotate_ft = registry.base_net, registry.finetunes["rotate"].net
    acc = digits_tasks.accuracy
    expected = {
        "rotate.accuracy": acc(model, "rotate"),
        "flip.accuracy": acc(model, "flip"),
        "control.digits.accuracy": acc(model, "digits"),
    }
    expected["mean.accuracy"] = (expected["rotate.accuracy"] + expected["flip.accuracy"]) / 2
    # The references: the base on every task, and rotate's own fine-tune (flip's weight is negative: no reference).
    for task in ("rotate", "flip"):
        expected[f"{task}.base_accuracy"] = acc(base, task)
        expected[f"{task}.delta_accuracy"] = expected[f"{task}.accuracy"] - acc(base, task)
    expected["control.digits.base_accuracy"] = acc(base, "digits")
    expected["control.digits.delta_accuracy"] = expected["control.digits.accuracy"] - acc(base, "digits")
    expected["rotate.finetuned_accuracy"] = acc(rotate_ft, "rotate")
    expected["rotate.normalized_accuracy"] = expected["rotate.accuracy"] / acc(rotate_ft, "rotate")
    expected["mean.base_accuracy"] = (acc(base, "rotate") + acc(base, "flip")) / 2
    expected["mean.delta_accuracy"] = (expected["rotate.delta_accuracy"] + expected["flip.delta_accuracy"]) / 2
    expected["mean.finetuned_accuracy"] = expected["rotate.finetuned_accuracy"]
    expected["mean.normalized_accuracy"] = expected["rotate.normalized_accuracy"]

    run_metrics = client.get_run(reg.run_id).data.metrics
    model_metrics = {m.key: m.value for m in client.get_logged_model(reg.model_id).metrics}

    assert run_metrics == pytest.approx(expected)
    assert model_metrics == pytest.approx(expected)
    description = client.get_model_version("digits-evaluated", reg.version).description
    assert "| task | accuracy | base_accuracy | delta_accuracy | finetuned_accuracy | normalized_accuracy |" in description
    row = f"| rotate | {expected['rotate.accuracy']:.6g} | {expected['rotate.base_accuracy']:.6g} |"
    assert row in description
    assert f"| control.digits | {expected['control.digits.accuracy']:.6g} |" in description


def test_reference_metrics_are_cached_by_fingerprint_across_composites(registry, client):
    from mlflow_taskvec.evaluation import MetricCache
    from mlflow_taskvec.mlflow.evaluate import composite_evaluation

    inputs = resolve_inputs(parse_recipe(_recipe_with_evaluation(["rotate", "flip"])))
    cache = MetricCache(registry.store.root / "metric-cache")
    first = composite_evaluation(inputs, cache).references("test")
    assert (cache.hits, cache.misses) == (0, 4)  # base on rotate, flip, digits; rotate's fine-tune

    again = composite_evaluation(inputs, cache).references("test")
    assert (cache.hits, cache.misses) == (4, 4)
    assert again == first
    assert first.base["digits"]["accuracy"] == pytest.approx(digits_tasks.accuracy(registry.base_net, "digits"))
    assert first.finetuned == {"rotate": {"accuracy": pytest.approx(digits_tasks.accuracy(registry.finetunes["rotate"].net, "rotate"))}}


def new_runs_since(client, run_ids_before: set[str]) -> list:
    return [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.info.run_id not in run_ids_before]


def run_ids(client) -> set[str]:
    return {r.info.run_id for r in new_runs_since(client, set())}


def test_a_failing_evaluator_raises_a_clear_error_and_registers_nothing(registry, client):
    recipe = parse_recipe(_recipe_with_evaluation(["no-such-task"]))
    before = run_ids(client)

    with pytest.raises(TaskVecError, match=r"^digits_tasks:evaluate failed on task 'no-such-task': ValueError: unknown task"):
        register_composite(recipe, "digits-broken")

    assert client.search_model_versions("name='digits-broken'") == []
    assert client.search_registered_models("name='digits-broken'") == []
    assert mlflow.active_run() is None
    assert [r.info.status for r in new_runs_since(client, before)] == ["FAILED"]  # the compose run, ended by the error


def write_evaluator(directory: Path, module: str, returns: str) -> str:
    """A module ``module.py`` in ``directory`` whose ``evaluate`` returns the Python expression ``returns``."""
    (directory / f"{module}.py").write_text(f"def evaluate(model, task, split):\n    return {returns}\n", "utf-8")
    return f"{module}:evaluate"


@pytest.mark.parametrize(
    "returns, shown",
    [
        ('{"accuracy": float("nan")}', "accuracy=nan"),
        ('{"accuracy": float("-inf")}', "accuracy=-inf"),
        ('{"accuracy": "0.9"}', "accuracy='0.9'"),
        ('{"accuracy": None}', "accuracy=None"),
        ('{"accuracy": True}', "accuracy=True"),
    ],
    ids=["nan", "inf", "string", "none", "bool"],
)
def test_an_evaluator_returning_anything_but_finite_numbers_is_refused_naming_it_and_the_task(registry, client, tmp_path, monkeypatch, returns, shown, request):
    module = f"evaluator_{request.node.callspec.id}"
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_evaluator(tmp_path, module, returns)
    recipe = {**composite_recipe(), "evaluation": {"evaluator": spec, "tasks": ["rotate"]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), "utf-8")
    name = f"nonfinite-{request.node.callspec.id}"
    before = run_ids(client)

    result = CliRunner().invoke(cli, ["compose", str(tmp_path / "recipe.yaml"), "--register", name])

    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"Error: {spec} returned {shown} for task 'rotate', not a finite number"]
    assert client.search_registered_models(f"name='{name}'") == []
    assert [r.info.status for r in new_runs_since(client, before)] == ["FAILED"]  # the compose run, ended by the error


def test_an_evaluator_returning_no_dict_is_refused_naming_what_it_returned(registry, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_evaluator(tmp_path, "evaluator_returning_a_list", "[0.5]")
    recipe = parse_recipe({**composite_recipe(), "evaluation": {"evaluator": spec, "tasks": ["rotate"]}})

    with pytest.raises(TaskVecError, match=r"^evaluator_returning_a_list:evaluate returned list for task 'rotate', not a dict of metrics$"):
        register_composite(recipe, "no-dict-evaluated")


def references_all_scoring(accuracy: float):
    """The references (the base, and rotate's fine-tune) on task rotate, all scoring ``accuracy``."""
    from mlflow_taskvec.evaluation import References

    return References(base={"rotate": {"accuracy": accuracy}}, finetuned={"rotate": {"accuracy": accuracy}})


def test_editing_the_evaluators_file_misses_the_metric_cache(registry, tmp_path, monkeypatch):
    import sys

    from mlflow_taskvec.evaluation import MetricCache
    from mlflow_taskvec.mlflow.evaluate import composite_evaluation

    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_evaluator(tmp_path, "evaluator_to_edit", '{"accuracy": 0.25}')
    inputs = resolve_inputs(parse_recipe({**composite_recipe(), "evaluation": {"evaluator": spec, "tasks": ["rotate"]}}))
    cache = MetricCache(tmp_path / "metric-cache")

    first = composite_evaluation(inputs, cache).references("test")
    again = composite_evaluation(inputs, cache).references("test")
    assert (cache.hits, cache.misses) == (2, 2)  # the base and rotate's fine-tune, on rotate

    write_evaluator(tmp_path, "evaluator_to_edit", '{"accuracy": 0.75}')
    monkeypatch.delitem(sys.modules, "evaluator_to_edit")  # as a new process would import it
    edited = composite_evaluation(inputs, cache).references("test")

    assert (cache.hits, cache.misses) == (2, 4)
    assert first == again == references_all_scoring(0.25)
    assert edited == references_all_scoring(0.75)



# -- references and the download cache ---------------------------------------------------------


def test_alias_version_and_model_id_references_resolve_to_the_same_fingerprint(registry, fresh_cache):
    reg = registry.vectors["flip"]

    by_version = resolve(f"models:/{vector_name('flip')}/1")
    by_alias = resolve(f"models:/{vector_name('flip')}@current")
    by_model_id = resolve(f"models:/{reg.model_id}")

    assert by_version.fingerprint == by_alias.fingerprint == by_model_id.fingerprint == reg.tags["taskvec.fingerprint"]
    assert by_version.canonical == by_alias.canonical == f"models:/{vector_name('flip')}/1"
    assert by_model_id.canonical == f"models:/{reg.model_id}"
    assert open_checkpoint(by_model_id.path).fingerprint() == reg.tags["taskvec.fingerprint"]


def test_a_runs_reference_to_a_run_artifact_resolves_to_the_models_fingerprint(registry, tmp_path, fresh_cache):
    flavor.save_model(registry.base_net, tmp_path / "exported", factory=FACTORY, factory_kwargs=FACTORY_KWARGS, code_paths=CODE_PATHS)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "exported"), artifact_path="exported")

    resolved = resolve(f"runs:/{run.info.run_id}/exported")

    assert resolved.fingerprint == resolve(f"models:/{BASE_NAME}/1").fingerprint
    assert resolved.canonical == f"runs:/{run.info.run_id}/exported"
    assert resolved.run_id == run.info.run_id


def test_a_runs_reference_to_a_logged_model_resolves_to_the_versions_fingerprint(registry, fresh_cache):
    ft = registry.finetunes["rotate"]
    reg = registry.vectors["rotate"]

    resolved = resolve(f"runs:/{ft.run_id}/task_vector")

    assert resolved.fingerprint == reg.tags["taskvec.fingerprint"]


def test_mlflow_itself_downloads_a_logged_model_through_its_runs_uri(registry, tmp_path):
    """The behaviour the runs:/ reference above should match."""
    ft = registry.finetunes["rotate"]

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{ft.run_id}/task_vector", dst_path=str(tmp_path)))

    assert open_checkpoint(local / "data").fingerprint() == registry.vectors["rotate"].tags["taskvec.fingerprint"]


def test_resolving_the_same_model_again_does_not_download_it_again(registry, fresh_cache):
    uri = f"models:/{vector_name('rotate')}/1"
    assert not fresh_cache.exists() or not any(fresh_cache.iterdir())

    first = resolve(uri)
    marker = first.path / "marker-left-in-the-cache"
    marker.write_text("a download would replace this folder", "utf-8")
    second = resolve(uri)
    by_alias = resolve(f"models:/{vector_name('rotate')}@current")

    assert first.canonical == second.canonical == uri
    assert second.path == first.path == by_alias.path
    assert marker.is_file()  # the cached folder was used as it is, not fetched again
    assert first.path.is_relative_to(fresh_cache)


def test_a_tampered_cached_file_is_fetched_again_and_verified(registry, fresh_cache):
    uri = f"models:/{vector_name('rotate')}/1"
    expected = registry.vectors["rotate"].tags["taskvec.fingerprint"]
    first = resolve(uri)
    (weights,) = sorted(first.path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte belongs to a tensor's data
    weights.write_bytes(bytes(data))
    assert open_checkpoint(weights).fingerprint() != expected

    again = resolve(uri)

    assert again.path == first.path
    assert again.fingerprint == expected
    assert open_checkpoint(again.path).fingerprint() == expected


# -- the command line --------------------------------------------------------------------------


def test_cli_extract_register_registers_the_vector_and_reports_its_version(registry, client):
    ft = registry.finetunes["flip"]
    args = ["extract", "--base", f"models:/{BASE_NAME}@current", "--finetuned", f"models:/{ft.model_id}", "--task", "flip", "--register", "cli-flip-vector"]

    result = CliRunner().invoke(cli, args, env={"MLFLOW_TRACKING_URI": registry.store.tracking_uri})

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("registered: models:/cli-flip-vector/1  (model models:/m-")
    tags = client.get_model_version("cli-flip-vector", "1").tags
    assert tags["taskvec.fingerprint"] == registry.vectors["flip"].tags["taskvec.fingerprint"]
    assert tags["taskvec.base_uri"] == f"models:/{BASE_NAME}/1"
    assert client.get_model_version("cli-flip-vector", "1").run_id == ft.run_id


def test_cli_compose_register_registers_the_composite_and_reports_its_version(registry, client, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(composite_recipe(), sort_keys=False), "utf-8")

    result = CliRunner().invoke(cli, ["compose", str(recipe), "--register", "cli-composite"], env={"MLFLOW_TRACKING_URI": registry.store.tracking_uri})

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("registered: models:/cli-composite/1  (model models:/m-")
    tags = client.get_model_version("cli-composite", "1").tags
    plain = client.get_model_version(COMPOSITE_NAME, "1").tags
    assert tags["taskvec.kind"] == "composite"
    assert tags["taskvec.fingerprint"] == plain["taskvec.fingerprint"]
    assert tags["taskvec.recipe_sha256"] == plain["taskvec.recipe_sha256"]
    assert f"fingerprint: {plain['taskvec.fingerprint']}" in result.stdout.splitlines()


def test_cli_compose_register_with_an_output_leaves_the_registered_composite_there_and_nothing_else(registry, client, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(composite_recipe(), sort_keys=False), "utf-8")
    output = tmp_path / "out" / "composite.safetensors"
    output.parent.mkdir()
    output.write_bytes(b"an older output")

    result = CliRunner().invoke(cli, ["compose", str(recipe), "--register", "cli-composite-output", "-o", str(output), "--overwrite"])

    assert result.exit_code == 0, result.output
    registered = client.get_model_version("cli-composite-output", "1").tags["taskvec.fingerprint"]
    assert open_checkpoint(output).fingerprint(fresh=True) == registered
    assert sorted(p.name for p in output.parent.iterdir()) == ["composite.safetensors"]


# -- a later method with per-layer coefficients ------------------------------------------------

PER_LAYER_WEIGHT = {"encoder.0.*": 0.3, "*": 1.0}
PER_LAYER_SCALE = {"*.bias": 0.5, "*": 0.7}


@pytest.fixture(scope="module")
def per_layer_composite(registry):
    recipe = composite_recipe()
    recipe.update(method="tsv_m", scale=PER_LAYER_SCALE, params={"exclude": ["heads.*"]})
    recipe["vectors"][0]["weight"] = PER_LAYER_WEIGHT
    return register_composite(parse_recipe(recipe), "digits-tsv-per-layer")


def test_per_layer_coefficients_are_recorded_in_order_in_tags_and_run_params(per_layer_composite, client):
    version = client.get_model_version("digits-tsv-per-layer", "1")
    run = client.get_run(per_layer_composite.run_id)

    assert version.tags["taskvec.method"] == "tsv_m"
    assert json.loads(version.tags["taskvec.params"]) == {"exclude": ["heads.*"]}
    assert version.tags["taskvec.scale"] == json.dumps(PER_LAYER_SCALE)
    inputs = json.loads(version.tags["taskvec.inputs"])
    assert list(inputs[0]["weight"].items()) == list(PER_LAYER_WEIGHT.items()) and inputs[1]["weight"] == COMPOSITE_WEIGHTS["flip"]
    assert json.loads(run.data.params["vectors.0.weight"]) == PER_LAYER_WEIGHT
    assert json.loads(run.data.params["scale"]) == PER_LAYER_SCALE
    assert '| {"encoder.0.*": 0.3, "*": 1.0} |' in version.description


def test_a_per_layer_composite_holds_what_the_engine_composes_and_verifies(registry, per_layer_composite):
    from mlflow_taskvec.engine.merging import merge
    from mlflow_taskvec.mlflow.verify import verify

    vectors = [resolve(f"models:/{vector_name(task)}/1") for task in ("rotate", "flip")]
    expected = merge(
        resolve(registry.base_uri).path,
        [TaskVector.load(v.path) for v in vectors],
        [PER_LAYER_WEIGHT, COMPOSITE_WEIGHTS["flip"]],
        method="tsv_m",
        scale=PER_LAYER_SCALE,
        params={"exclude": ["heads.*"]},
    )
    stored = open_checkpoint(resolve(per_layer_composite.model_uri).path)
    for name, tensor in expected.items():
        assert torch.equal(stored.get_tensor(name), tensor), name
    assert verify("models:/digits-tsv-per-layer/1").fingerprint == per_layer_composite.tags["taskvec.fingerprint"]


def test_lineage_shows_per_layer_weights_and_scale(per_layer_composite):
    from mlflow_taskvec.mlflow.lineage import lineage, render_dot, render_text

    text = render_text(lineage("models:/digits-tsv-per-layer/1"))
    assert 'method tsv_m scale {"*.bias": 0.5, "*": 0.7}' in text
    assert "weight {encoder.0.*: 0.3, *: 1}" in text and "weight -0.5" in text
    assert "input {encoder.0.*: 0.3, *: 1}" in render_dot(lineage("models:/digits-tsv-per-layer/1"))


def test_the_report_lists_per_layer_weights_and_scale(per_layer_composite):
    from mlflow_taskvec.mlflow.report import composites_frame

    row = composites_frame("digits-tsv-per-layer").loc[1]
    assert row["method"] == "tsv_m" and row["scale"] == json.dumps(PER_LAYER_SCALE)
    assert row["weights"] == f"models:/{vector_name('rotate')}/1:{{encoder.0.*: 0.3, *: 1}}, models:/{vector_name('flip')}/1:-0.5"


def test_a_registered_input_is_fingerprinted_once_while_it_downloads_and_not_again_to_compose(registry, fresh_cache, tmp_path, monkeypatch):
    """Each downloaded input is hashed while MLflow writes it, and neither after the download nor
    to compose from it (its fingerprint is known under the cache's name too); a later resolution
    checks the cached copy once."""
    after, during = count_hashing(monkeypatch)
    recipe = parse_recipe({"base": f"models:/{BASE_NAME}/1", "vectors": [{"vector": f"models:/{vector_name('rotate')}/1"}]}, "test recipe")

    inputs = resolve_inputs(recipe)
    inputs.check_same_base()
    result = compose_to(inputs.local(), output=tmp_path / "composite.safetensors")
    stored = sum(open_checkpoint(r.path).stored_bytes for r in (inputs.base, *inputs.vectors))

    assert all(r.path.is_relative_to(fresh_cache) for r in (inputs.base, *inputs.vectors))  # both were downloaded
    assert sum(during) == stored  # every stored byte hashed once, as it was downloaded
    assert sum(after) == 0  # not again after the download, nor to compose
    assert result.base_fingerprint == inputs.base.fingerprint == open_checkpoint(inputs.base.path).fingerprint(fresh=True)
    assert inputs.vectors[0].fingerprint == open_checkpoint(inputs.vectors[0].path).fingerprint(fresh=True)
    after.clear(), during.clear()

    again = resolve_inputs(recipe)
    compose_to(again.local(), output=tmp_path / "again.safetensors")

    assert sum(after) == stored and sum(during) == 0  # the cached copies checked once each, then composed without a second pass


def test_registering_a_composite_hashes_only_its_inputs_once(registry, fresh_cache, monkeypatch):
    """The composite is hashed as it is written; logging it links its files and reads none of
    them again for its fingerprint, and each downloaded input is hashed once."""
    after, during = count_hashing(monkeypatch)

    reg = register_composite(parse_recipe(composite_recipe()), "digits-hashed-once")

    inputs = resolve_inputs(parse_recipe(composite_recipe()))  # from the cache: hashed once more each
    stored = sum(open_checkpoint(r.path).stored_bytes for r in (inputs.base, *inputs.vectors))
    assert (sum(during), sum(after)) == (stored, stored)  # downloaded: hashed as they were written; then checked in the cache
    assert reg.tags["taskvec.fingerprint"] == open_checkpoint(resolve(reg.version_uri).path).fingerprint(fresh=True)
