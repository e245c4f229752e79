"""``mlflow-taskvec leaderboard``: every method's searched winner of one recipe's inputs, ranked.

A real sqlite store with the digits example's small MLP (hidden 16) and two real
fine-tunes (``parity``, ``large``); every merge method of the catalogue and
``adamerging`` are ranked, each searched on the validation split and evaluated
on the test split.
"""

from __future__ import annotations

import json

import matplotlib.image
import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from mlflow_helpers import BASE_NAME, mlflow_store, register_trained_vectors, run_artifact, template_db, vector_name

from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.engine.methods import METHODS
from mlflow_taskvec.mlflow.leaderboard import leaderboard_recipe, method_recipe
from mlflow_taskvec.recipe import parse_recipe

# about 35 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(35)

TASKS = ("parity", "large")
METHOD_NAMES = [*METHODS, "adamerging"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("leaderboard"), template_db(tmp_path_factory)) as store:
        register_trained_vectors(TASKS)
        yield store


def recipe_data() -> dict:
    return {
        "base": f"models:/{BASE_NAME}/1",
        "vectors": [{"vector": f"models:/{vector_name(t)}/1", "weight": 1.0} for t in TASKS],
        "evaluation": {"evaluator": "digits_tasks:evaluate", "tasks": list(TASKS)},
        "search": {"trials": 6, "adamerging": {"steps": 10, "lr": 0.02}},
    }


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def board(store, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(), sort_keys=False), "utf-8")
    result = invoke("leaderboard", path, "--methods", ",".join(METHOD_NAMES), "--format", "json", "--register", "digits-best")
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    (parent,) = client.search_runs([store.experiment_id], "tags.`taskvec.leaderboard.role` = 'leaderboard'")
    return json.loads(result.stdout), parent, client


def test_the_leaderboard_has_one_child_run_per_method_and_a_row_for_each(board, store):
    rows, parent, client = board
    children = client.search_runs([store.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")

    assert sorted(r.data.tags["taskvec.leaderboard.method"] for r in children) == sorted(METHOD_NAMES)
    assert sorted(row["method"] for row in rows) == sorted(METHOD_NAMES)
    assert [row["rank"] for row in rows] == list(range(1, len(METHOD_NAMES) + 1))
    scores = [row["mean normalized accuracy"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert parent.data.tags["taskvec.leaderboard.best"] == rows[0]["method"]


def test_each_row_is_its_method_runs_test_split_winner(board, store):
    rows, _, client = board
    for row in rows:
        run = client.get_run(row["run"])
        metrics = run.data.metrics
        # the child run is the method's search run: its test.* metrics are the row's
        assert row["mean normalized accuracy"] == pytest.approx(metrics["test.mean.normalized_accuracy"], abs=1e-12)
        assert row["mean accuracy"] == pytest.approx(metrics["test.mean.accuracy"], abs=1e-12)
        for task in TASKS:
            assert row[task] == pytest.approx(metrics[f"test.{task}.accuracy"], abs=1e-12)
        # normalized accuracy is the composite's over the task's own fine-tune's, averaged over tasks
        normalized = [metrics[f"test.{t}.accuracy"] / metrics[f"test.{t}.finetuned_accuracy"] for t in TASKS]
        assert row["mean normalized accuracy"] == pytest.approx(sum(normalized) / len(normalized), abs=1e-12)
        assert row["compose s"] > 0 and row["search s"] > row["compose s"]
        strategy = run.data.params["search.strategy"]
        if row["method"] == "adamerging":
            assert strategy == "adamerging" and "weights per layer" in row["coefficients"]
        elif METHODS[row["method"]].searchable_params():
            assert (strategy, run.data.params["search.trials"]) == ("optuna", "6")
        else:
            assert (strategy, run.data.params["search.scale"]) == ("grid", "0..2 step 0.05")


def test_the_parent_run_holds_the_table_and_the_bar_chart(board):
    rows, parent, client = board
    md = run_artifact(client, parent.info.run_id, "leaderboard/leaderboard.md").read_text().splitlines()
    csv = run_artifact(client, parent.info.run_id, "leaderboard/leaderboard.csv").read_text().splitlines()
    chart = matplotlib.image.imread(run_artifact(client, parent.info.run_id, "leaderboard/leaderboard.png"))

    assert md[0].startswith("| rank | method | mean normalized accuracy | mean accuracy | parity | large | coefficients | compose s | search s |")
    assert len(md) == 2 + len(METHOD_NAMES) and len(csv) == 1 + len(METHOD_NAMES)
    assert json.loads(run_artifact(client, parent.info.run_id, "leaderboard/leaderboard.json").read_text()) == rows
    assert chart.shape[0] > 300 and chart.shape[1] > 500
    for row in rows:
        assert parent.data.metrics[f"{row['method']}.mean.normalized_accuracy"] == pytest.approx(row["mean normalized accuracy"], abs=1e-12)


def test_register_registers_the_best_with_its_table_metrics(board):
    rows, parent, client = board
    (version,) = client.search_model_versions("name = 'digits-best'")
    best = rows[0]
    metrics = client.get_run(version.run_id).data.metrics

    assert best["registered"] == "models:/digits-best/1"
    assert json.loads(version.tags["taskvec.leaderboard"]) == {"method": best["method"], "leaderboard_run_id": parent.info.run_id}
    assert metrics["mean.normalized_accuracy"] == pytest.approx(best["mean normalized accuracy"], abs=1e-12)
    assert client.get_run(version.run_id).data.tags["mlflow.parentRunId"] == best["run"]


def test_register_each_registers_every_winner_and_points_best_at_the_first(store, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(), sort_keys=False), "utf-8")

    result = invoke("leaderboard", path, "--methods", "task_arithmetic,tsv_m", "--register", "digits-each", "--register-each", "--format", "csv")

    assert result.exit_code == 0, result.output
    client = MlflowClient()
    versions = client.search_model_versions("name = 'digits-each'")
    header, *lines = result.stdout.splitlines()
    first_method = lines[0].split(",")[1]
    assert len(versions) == 2
    best = client.get_model_version_by_alias("digits-each", "best")
    assert json.loads(best.tags["taskvec.leaderboard"])["method"] == first_method


def test_leaderboard_recipe_ranks_the_methods_with_the_trials_given_and_reports_the_run(store, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(), sort_keys=False), "utf-8")

    board = leaderboard_recipe(path, ["task_arithmetic", "ties"], trials=2)

    by_method = {e.method: e for e in board.entries}
    assert sorted(by_method) == ["task_arithmetic", "ties"]
    assert len(by_method["ties"].result.candidates) == 2  # optuna over ties' parameters: the trials given, not the recipe's 6
    assert len(by_method["task_arithmetic"].result.candidates) == 41  # a grid over the scale, 0 to 2 step 0.05
    scores = [e.metrics["mean.normalized_accuracy"] for e in board.entries]
    assert scores == sorted(scores, reverse=True) and board.best is board.entries[0]
    assert MlflowClient().get_run(board.run_id).data.tags["taskvec.leaderboard.role"] == "leaderboard"
    assert board.lines() == [f"leaderboard run: {board.run_id}  best: {board.entries[0].method}"]
    header, *rows = board.render("csv").splitlines()
    assert header.startswith("rank,method,") and [r.split(",")[1] for r in rows] == [e.method for e in board.entries]


def test_method_recipes_search_their_declared_ranges_and_the_scale_to_two():
    recipe = parse_recipe(recipe_data())

    ties = method_recipe(recipe, "ties").search
    della = method_recipe(recipe, "della").search
    tsv = method_recipe(recipe, "tsv_m").search

    assert (ties.strategy, ties.scale.high, ties.params["density"].low, ties.params["density"].high) == ("optuna", 2.0, 0.01, 1.0)
    assert sorted(della.params) == ["density", "epsilon"] and della.params["epsilon"].high == pytest.approx(0.495)  # [0, 0.5): 1% inside
    assert (tsv.strategy, tsv.scale.grid()[-1], len(tsv.scale.grid())) == ("grid", 2.0, 41)
    assert method_recipe(recipe, "adamerging").method == "task_arithmetic"


@pytest.mark.parametrize(
    "methods, fragment",
    [
        ("ties,fancy_merge", "--methods: unknown method 'fancy_merge' (known: task_arithmetic, "),
        ("ties,ties", "--methods: 'ties' is listed twice"),
        (" , ", "--methods: name at least one method"),
    ],
)
def test_a_bad_method_list_is_one_line_and_starts_no_run(store, tmp_path, methods, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(), sort_keys=False), "utf-8")
    client = MlflowClient()
    before = len(client.search_runs([store.experiment_id]))

    result = invoke("leaderboard", path, "--methods", methods)

    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
    assert len(client.search_runs([store.experiment_id])) == before


def test_registering_into_a_model_mlflow_taskvec_did_not_make_is_refused_before_any_run(store, tmp_path):
    client = MlflowClient()
    if not client.search_model_versions("name = 'plain-leaderboard-model'"):
        (base,) = client.search_model_versions(f"name = '{BASE_NAME}'")
        client.create_registered_model("plain-leaderboard-model")
        client.create_model_version("plain-leaderboard-model", base.source, run_id=base.run_id)  # no taskvec tags
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(), sort_keys=False), "utf-8")
    before = len(client.search_runs([store.experiment_id]))

    result = invoke("leaderboard", path, "--methods", "task_arithmetic", "--register", "plain-leaderboard-model")

    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        "Error: registered model 'plain-leaderboard-model' holds versions mlflow-taskvec did not register "
        "(version 1 has no taskvec.kind tag); register under another name, or pass --allow-mixed to add to it anyway"
    )
    assert len(client.search_runs([store.experiment_id])) == before
    assert len(client.search_model_versions("name = 'plain-leaderboard-model'")) == 1


def test_register_each_without_a_name_is_a_usage_error(store, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(), sort_keys=False), "utf-8")

    result = invoke("leaderboard", path, "--methods", "ties", "--register-each")

    assert result.exit_code == 2 and "--register-each needs --register NAME" in result.stderr


def test_the_mlproject_entry_point_is_the_leaderboard_command(store, tmp_path):
    import shlex
    from pathlib import Path

    project = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text("utf-8"))
    entry = project["entry_points"]["leaderboard"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data(), sort_keys=False), "utf-8")
    # MLflow substitutes each parameter shell-quoted; unset strings are ''
    values = {name: spec.get("default", "") for name, spec in entry["parameters"].items()}
    values.update(recipe=str(path), methods="ties,no_such_method")
    argv = shlex.split(entry["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()}))

    assert argv[:2] == ["mlflow-taskvec", "leaderboard"]
    assert entry["parameters"]["methods"]["default"].split(",") == [
        "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "breadcrumbs_ties", "della", "consensus_ta", "adamerging"]
    result = invoke(*argv[1:])
    assert result.exit_code == 1 and "--methods: unknown method 'no_such_method'" in result.stderr, result.output
