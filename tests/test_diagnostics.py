"""Diagnostics: the cosine-similarity matrix of task vectors and the composite report."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow_helpers import COMPOSITE_NAME, build_registry, mlflow_store, template_db
from safetensors.torch import save_file
from small_models import base_state, finetune_state

from mlflow_taskvec import TaskVecError, TaskVector
from mlflow_taskvec.cli import main
from mlflow_taskvec.engine.describe import cosine_matrix
from mlflow_taskvec.recipe import parse_recipe
from mlflow_taskvec.mlflow.registry import register_composite


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def vectors(tmp_path):
    base = base_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, task in enumerate(["a", "b", "c"]):
        save_file(finetune_state(base, i + 1), str(tmp_path / f"ft-{task}.safetensors"))
        vector = TaskVector.extract(tmp_path / "base.safetensors", tmp_path / f"ft-{task}.safetensors", task=task)
        vector.save(tmp_path / f"{task}.safetensors")
        paths.append(tmp_path / f"{task}.safetensors")
    return paths


def test_a_vector_is_fully_similar_to_itself_and_opposite_to_its_negation(vectors):
    a = TaskVector.load(vectors[0])

    matrix = cosine_matrix([a, a, -a])

    torch.testing.assert_close(matrix, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=torch.float64))


def test_the_matrix_matches_pairwise_cosines(vectors):
    loaded = [TaskVector.load(p) for p in vectors]

    matrix = cosine_matrix(loaded)

    for i in range(3):
        for j in range(3):
            assert matrix[i, j].item() == pytest.approx(loaded[i].cosine(loaded[j]), abs=1e-12)
    assert torch.equal(matrix, matrix.T)


def test_a_zero_vector_has_no_cosine(vectors):
    a = TaskVector.load(vectors[0])

    with pytest.raises(TaskVecError, match="the task vector is all zeros") as info:
        cosine_matrix([a, a * 0.0])
    assert str(info.value).startswith(f"{vectors[0]}: ")


def test_similarity_prints_the_matrix_labelled_by_task_and_writes_a_heatmap(vectors, tmp_path):
    result = cli("similarity", *vectors, "--format", "csv", "--heatmap", tmp_path / "heat.png")

    assert result.exit_code == 0, result.output
    csv_text = result.stdout
    frame = pd.read_csv(io.StringIO(csv_text), index_col=0)
    assert list(frame.columns) == ["a", "b", "c"] and list(frame.index) == ["a", "b", "c"]
    assert frame.loc["a", "a"] == pytest.approx(1.0)
    assert frame.loc["a", "b"] == pytest.approx(TaskVector.load(vectors[0]).cosine(TaskVector.load(vectors[1])))
    png = (tmp_path / "heat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_similarity_inside_an_mlflow_run_logs_its_heatmap_to_that_run(vectors, tmp_path, tmp_path_factory):
    from mlflow_helpers import run_artifact

    with mlflow_store(tmp_path / "store", template_db(tmp_path_factory)) as store:
        run_id = store.client.create_run(store.experiment_id).info.run_id
        # how `mlflow run` tells an entry point's command which run it is in
        result = CliRunner().invoke(main, ["similarity", *map(str, vectors), "--heatmap", str(tmp_path / "sim.png")], env={"MLFLOW_RUN_ID": run_id})

        assert result.exit_code == 0, result.output
        assert [a.path for a in store.client.list_artifacts(run_id)] == ["sim.png"]
        assert run_artifact(store.client, run_id, "sim.png").read_bytes() == (tmp_path / "sim.png").read_bytes()


def test_similarity_of_vectors_from_different_bases_fails_in_one_line(vectors, tmp_path):
    other = base_state(5)
    save_file(other, str(tmp_path / "other.safetensors"))
    save_file(finetune_state(other, 6), str(tmp_path / "other-ft.safetensors"))
    TaskVector.extract(tmp_path / "other.safetensors", tmp_path / "other-ft.safetensors").save(tmp_path / "x.safetensors")

    result = cli("similarity", vectors[0], tmp_path / "x.safetensors")

    assert result.exit_code == 1
    assert "different bases" in result.output and len(result.output.strip().splitlines()) == 1


# -- report ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json", "markdown", "table"])
def test_report_lists_the_composite_with_its_method_weights_and_scale(registry, fmt):
    tags = registry.composite.tags

    result = cli("report", COMPOSITE_NAME, "--format", fmt)

    assert result.exit_code == 0, result.output
    inputs = json.loads(tags["taskvec.inputs"])
    if fmt == "csv":
        frame = pd.read_csv(io.StringIO(result.output), index_col="version")
        assert frame.loc[1, "method"] == tags["taskvec.method"]
        assert frame.loc[1, "scale"] == pytest.approx(float(tags["taskvec.scale"]))
        assert frame.loc[1, "weights"] == ", ".join(f"{i['uri']}:{i['weight']:g}" for i in inputs)
    elif fmt == "json":
        data = json.loads(result.output)
        assert data["index"] == [1]
        row = dict(zip(data["columns"], data["data"][0]))
        assert row["method"] == tags["taskvec.method"]
    elif fmt == "markdown":
        lines = result.output.strip().splitlines()
        assert lines[0].startswith("| version | method | scale |") and lines[1].startswith("|---|")
        assert f"| 1 | {tags['taskvec.method']} |" in lines[2]
    else:
        assert tags["taskvec.method"] in result.output and inputs[0]["uri"] in result.output


def test_report_on_a_name_without_composites_fails_clearly(registry):
    result = cli("report", "no-such-model")

    assert result.exit_code == 1
    assert result.output.strip() == "Error: no-such-model: no registered model or experiment of this name"


def test_report_on_an_experiment_lists_the_composites_composed_in_it(registry):
    result = cli("report", "taskvec-tests", "--format", "csv", "--metric", "mean.*")

    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.output), index_col="version")
    assert list(frame.index) == [1]
    assert frame.loc[1, "method"] == registry.composite.tags["taskvec.method"]


def test_report_keeps_only_the_metrics_that_match(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("report-metrics"), template_db(tmp_path_factory)) as store:
        reg = build_registry(store)
        recipe = {**reg.composite_recipe, "evaluation": {"evaluator": "digits_tasks:evaluate", "tasks": ["rotate"], "control_tasks": ["digits"]}}
        register_composite(parse_recipe(recipe), COMPOSITE_NAME)

        result = cli("report", COMPOSITE_NAME, "--format", "json", "--metric", "mean.*", "--metric", "control.*.accuracy")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["index"] == [1, 2]
    metric_columns = [c for c in data["columns"] if c not in ("method", "scale", "params", "weights")]
    assert metric_columns == sorted(metric_columns) and metric_columns
    assert all(c.startswith("mean.") or c == "control.digits.accuracy" for c in metric_columns)
    assert "control.digits.accuracy" in metric_columns and "mean.normalized_accuracy" in metric_columns
