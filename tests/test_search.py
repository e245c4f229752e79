"""Coefficient search against a real sqlite store (and optuna's RDB storage on the real PostgreSQL).

The evaluators in ``search_evaluators`` score the coefficient read back from the
composite's weights, so each test knows which candidate has to win.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow_helpers import (
    BASE_NAME,
    finetune_of,
    log_checkpoint,
    mlflow_store,
    signature_for,
    template_db,
    tiny_net,
    vector_name,
)
from safetensors.torch import save_file
from team_server import create_database, drop_database, pg_uri, require_postgres

from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.recipe import parse_recipe
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.registry import register_task_vector
from mlflow_taskvec.mlflow.search import search, search_recipe, with_options

# about 70 s under `make test`: sent out early (tests/conftest.py)
pytestmark = pytest.mark.seconds(70)

TESTS = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "mlflow-taskvec")
GRID = [round(0.05 * i, 10) for i in range(21)]


def _as_file(path: Path, target: Path) -> str:
    ckpt = open_checkpoint(path)
    save_file({n: ckpt.get_tensor(n).contiguous() for n in ckpt.keys()}, str(target))
    return str(target)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    with mlflow_store(root, template_db(tmp_path_factory)) as store, pytest.MonkeyPatch.context() as mp:
        base_net = tiny_net(0)
        with mlflow.start_run(run_name="pretrain"):
            log_checkpoint(base_net, "base", registered_model_name=BASE_NAME, signature=signature_for(base_net))
        base = resolve(f"models:/{BASE_NAME}/1")
        with mlflow.start_run(run_name="finetune"):
            info = log_checkpoint(finetune_of(base_net, seed=7), "finetuned")
        ft = resolve(info.model_uri)
        vector = TaskVector.extract(base.path, ft.path, task="target")
        register_task_vector(vector, vector_name("target"), base, ft, alias="current")
        files = {
            "TASKVEC_TEST_BASE": _as_file(base.path, root / "base.safetensors"),
            "TASKVEC_TEST_DIRECTION": _as_file(resolve(f"models:/{vector_name('target')}/1").path, root / "direction.safetensors"),
        }
        for key, value in files.items():
            mp.setenv(key, value)
        store.files = files
        yield store


def recipe(evaluator: str, tasks, weight: float = 1.0, control_tasks=(), search_block=None) -> dict:
    data = {
        "base": f"models:/{BASE_NAME}/1",
        "vectors": [{"vector": f"models:/{vector_name('target')}@current", "weight": weight}],
        "evaluation": {"evaluator": f"search_evaluators:{evaluator}", "tasks": list(tasks), "control_tasks": list(control_tasks)},
    }
    if search_block is not None:
        data["search"] = search_block
    return data


def children_of(client, run_id: str):
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)


def artifact_text(client, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text("utf-8")


# -- the paper's protocol: a grid over the scale ----------------------------------------------


def test_the_grid_picks_the_scale_that_is_best_on_validation_and_reports_test(store, tmp_path):
    client = store.client
    result = search(parse_recipe(recipe("peaked", ["target"], search_block={"objective": "mean.accuracy"})), register_as="searched", alias="best")

    assert [c.scale for c in result.candidates] == GRID
    assert result.best.scale == pytest.approx(0.35)
    assert result.best.objective == pytest.approx(1.0, abs=1e-9)
    # The final evaluation is on the test split, whose peak is at 0.5.
    assert result.test_metrics["target.accuracy"] == pytest.approx(1 - (0.35 - 0.5) ** 2, abs=1e-6)

    children = children_of(client, result.run_id)
    candidates = [r for r in children if r.data.tags.get("taskvec.search.role") == "candidate"]
    assert sorted(float(r.data.params["scale"]) for r in candidates) == GRID
    for run in candidates:
        s = float(run.data.params["scale"])
        assert run.data.metrics["target.accuracy"] == pytest.approx(1 - (s - 0.35) ** 2, abs=1e-6)
        assert run.data.params["weight.target"] == "1.0"
    (winner,) = [r for r in children if r.data.tags.get("taskvec.search.role") == "winner"]

    version = client.get_model_version("searched", result.registered.version)
    assert version.run_id == winner.info.run_id
    assert version.tags["taskvec.scale"] == "0.35"
    lineage = json.loads(version.tags["taskvec.search"])
    assert lineage["strategy"] == "grid" and lineage["candidates"] == 21 and lineage["search_run_id"] == result.run_id
    assert lineage["best_candidate_run_id"] == result.best.run_id
    assert "Coefficients picked by search: a grid over scale 0..1 step 0.05" in version.description
    assert str(client.get_model_version_by_alias("searched", "best").version) == result.registered.version
    assert winner.data.metrics["target.accuracy"] == pytest.approx(result.test_metrics["target.accuracy"])

    rows = list(csv.DictReader(io.StringIO(artifact_text(client, result.run_id, "search/candidates.csv", tmp_path))))
    assert len(rows) == 21
    best_row = max(rows, key=lambda r: float(r["objective"]))
    assert float(best_row["scale"]) == pytest.approx(0.35)
    png = Path(client.download_artifacts(result.run_id, "search/objective_vs_scale.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    best = yaml.safe_load(artifact_text(client, result.run_id, "search/best_recipe.yaml", tmp_path))
    assert best["scale"] == pytest.approx(0.35) and "search" not in best
    parent = client.get_run(result.run_id).data
    assert parent.metrics["best.scale"] == pytest.approx(0.35)
    assert parent.params["search.strategy"] == "grid"


def test_negation_takes_the_largest_drop_that_keeps_the_control_task(store):
    spec = parse_recipe(recipe("forgetting", ["target"], weight=-1.0, control_tasks=["control"]))

    result = search(spec)

    assert result.objective.kind == "negation"  # chosen by 'auto': every weight is negative
    # control >= 0.95 * base's (1.0) holds up to scale 0.65, where target has fallen by 0.65.
    assert result.best.scale == pytest.approx(0.65)
    assert result.best.objective == pytest.approx(0.65, abs=1e-6)
    assert result.test_metrics["target.delta_accuracy"] == pytest.approx(-0.65, abs=1e-6)
    assert result.test_metrics["control.control.accuracy"] == pytest.approx(0.97, abs=1e-6)
    infeasible = [c for c in result.candidates if not c.feasible]
    assert [c.scale for c in infeasible] == GRID[14:]


@pytest.mark.parametrize("ratio, scale", [(None, 0.65), (0.9, 0.7), (0.6, 1.0)])
def test_analogy_takes_the_largest_gain_that_keeps_the_control_task(store, ratio, scale):
    block = {"objective": "analogy", **({"control_min_ratio": ratio} if ratio is not None else {})}
    spec = parse_recipe(recipe("lifting", ["target"], control_tasks=["control"], search_block=block))

    result = search(spec)

    assert result.objective.kind == "analogy"
    ratio = 0.95 if ratio is None else ratio  # the default, as the negation's
    assert result.objective.describe == f"maximize the gain of mean.accuracy over the base, keeping each control task's accuracy at least {ratio:g} x the base's"
    # control = 1 - max(0, c - 0.62) >= ratio x the base's 1.0 up to c = 1.62 - ratio; the gain is 0.5 c
    assert result.best.scale == pytest.approx(scale)
    assert result.best.objective == pytest.approx(0.5 * scale, abs=1e-6)
    assert result.test_metrics["target.delta_accuracy"] == pytest.approx(0.5 * scale, abs=1e-6)
    assert result.test_metrics["control.control.accuracy"] >= ratio - 1e-9
    assert [c.scale for c in result.candidates if not c.feasible] == [c for c in GRID if c > 1.62 - ratio + 1e-9]
    # the plain metric objective, which this replaces, takes the whole grid's best target: the control falls
    plain = search(parse_recipe(recipe("lifting", ["target"], control_tasks=["control"], search_block={"objective": "target.accuracy"})))
    assert plain.best.scale == pytest.approx(1.0) and plain.test_metrics["control.control.accuracy"] == pytest.approx(0.62, abs=1e-6)


def test_candidates_composed_in_memory_and_through_a_temporary_folder_score_the_same(store):
    spec = parse_recipe(recipe("peaked", ["target"], search_block={"objective": "mean.accuracy", "scale": {"low": 0, "high": 1, "step": 0.25}}))

    in_memory = search(spec, memory="memory")
    streamed = search(spec, memory="streamed")

    assert [c.metrics for c in in_memory.candidates] == [c.metrics for c in streamed.candidates]


def test_a_failing_evaluator_stops_the_search_clearly_and_registers_nothing(store):
    spec = parse_recipe(recipe("broken", ["target"], search_block={"objective": "mean.accuracy"}))

    with pytest.raises(TaskVecError, match=r"search_evaluators:broken failed on task 'target': RuntimeError: the evaluation data is missing"):
        search(spec, register_as="never-registered")

    assert store.client.search_model_versions("name='never-registered'") == []
    assert mlflow.active_run() is None


def test_mean_normalized_needs_a_fine_tune_for_every_task(store):
    spec = parse_recipe(recipe("peaked", ["target", "other"], search_block={"objective": "mean_normalized"}))

    with pytest.raises(TaskVecError, match=r"objective mean_normalized needs a fine-tune for every evaluated task: task 'other' has no input vector"):
        search(spec)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"weights": {"low": 0, "high": 1}}, "weights and params ranges are searched by strategy optuna"),
        ({"scale": {"low": 1, "high": 0, "step": 0.1}}, "low 1 is above high 0"),
        ({"scale": {"low": 0, "high": 1}}, "strategy grid needs scale.step"),
        ({"strategy": "optuna", "params": {"density": {"low": 0.1, "high": 1}}}, "task_arithmetic has no parameter 'density'"),
        ({"strategy": "bayes"}, "search.strategy"),
        ({"storage": "sqlite:///x.db"}, "storage and study_name apply to strategy optuna"),
    ],
)
def test_a_bad_search_block_is_refused_with_its_field(block, message):
    with pytest.raises(TaskVecError, match=message):
        parse_recipe(recipe("peaked", ["target"], search_block=block))


# -- optuna, and several workers on one study in PostgreSQL ------------------------------------

@contextmanager
def postgres_database():
    """A fresh database on the machine's PostgreSQL (tests/team_server.py), dropped afterwards;
    skips (fails in CI) without one. Yields an optuna storage URL with SQLAlchemy's default
    driver, as a user would write it (``postgresql://``)."""
    require_postgres()
    name = create_database("taskvec_optuna")
    try:
        yield pg_uri(name, driver=None)
    finally:
        drop_database(name)


def test_optuna_searches_scale_and_weight_within_their_ranges(store):
    block = {"strategy": "optuna", "trials": 12, "objective": "mean.accuracy", "scale": {"low": 0.0, "high": 1.0}, "weights": {"low": 0.5, "high": 1.5}}

    result = search(parse_recipe(recipe("peaked", ["target"], search_block=block)))

    assert len(result.candidates) == 12
    for c in result.candidates:
        assert 0.0 <= c.scale <= 1.0 and 0.5 <= c.weights[0] <= 1.5
        # the coefficient is scale * weight; the metric peaks where it is 0.35
        assert c.metrics["target.accuracy"] == pytest.approx(1 - (c.scale * c.weights[0] - 0.35) ** 2, abs=1e-6)
    assert result.best.objective == max(c.objective for c in result.candidates)
    children = children_of(store.client, result.run_id)
    assert len(children) == 12
    assert {r.data.params["weight.target"] for r in children} == {str(c.weights[0]) for c in result.candidates}


def test_two_workers_share_one_optuna_study_in_postgresql(store, tmp_path):
    import optuna

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe("peaked", ["target"], search_block={"strategy": "optuna", "objective": "mean.accuracy", "scale": {"low": 0, "high": 1}})), "utf-8")
    env = store.env(**store.files, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    with postgres_database() as url:
        args = [CLI, "search", str(path), "--strategy", "optuna", "--trials", "4", "--storage", url, "--study-name", "shared"]
        workers = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [w.communicate(timeout=300) for w in workers]
        for w, (out, err) in zip(workers, outputs):
            assert w.returncode == 0, err[-3000:]
        study = optuna.load_study(study_name="shared", storage=url)
        trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        # A third worker registers the study's best (over all eight trials and its own two).
        done = subprocess.run([*args[:6], "2", *args[7:], "--register", "shared-best"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        study = optuna.load_study(study_name="shared", storage=url)
        best = max((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
        total = len(study.trials)

    assert len(trials) == 8 and total == 10
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == 8
    searches = [line.split()[2] for out, _ in outputs for line in out.splitlines() if line.startswith("search run:")]
    assert len(searches) == 2 and all(len(children_of(store.client, run_id)) == 4 for run_id in searches)
    version = store.client.get_model_version("shared-best", "1")
    assert float(version.tags["taskvec.scale"]) == pytest.approx(best.params["scale"])
    search_info = json.loads(version.tags["taskvec.search"])
    assert search_info["trials_in_study"] == 10
    # The winner's row in the third worker's table carries its validation metrics, wherever it ran.
    csv_text = artifact_text(store.client, search_info["search_run_id"], "search/candidates.csv", tmp_path)
    table = list(csv.DictReader(io.StringIO(csv_text)))
    (row,) = [r for r in table if r["run_id"] == best.user_attrs["mlflow_run_id"]]
    winner_metrics = store.client.get_run(best.user_attrs["mlflow_run_id"]).data.metrics
    assert len(winner_metrics) > 1 and {k: float(row[k]) for k in winner_metrics} == pytest.approx(winner_metrics)
    foreign = row["candidate"] == "-1"  # found by one of the first two workers
    assert foreign == (best.user_attrs["mlflow_run_id"] not in {r.info.run_id for r in children_of(store.client, search_info["search_run_id"])})
    assert len(table) == 2 + foreign


def test_search_recipe_applies_the_options_writes_the_winner_and_reports_it(store, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe("peaked", ["target"])), "utf-8")  # no search block: the objective is an option
    out = tmp_path / "best.yaml"

    result = search_recipe(path, objective="mean.accuracy", output_recipe=out)

    assert result.objective.name == "mean.accuracy" and result.best.scale == pytest.approx(0.35)
    assert result.winning_recipe == out and result.registered is None
    written = yaml.safe_load(out.read_text("utf-8"))
    assert written["scale"] == pytest.approx(0.35) and written["vectors"][0]["weight"] == 1.0 and "search" not in written
    test_accuracy = 1 - (0.35 - 0.5) ** 2  # the test split's peak is at 0.5
    assert result.test_metrics["mean.accuracy"] == pytest.approx(test_accuracy, abs=1e-6)
    assert result.lines() == [
        f"search run: {result.run_id}  candidates: 21  objective: {result.objective.describe}",
        "best: scale 0.35  weights [1.0]  objective 1.0000 (validation)",
        "test: " + "  ".join(f"{k}={result.test_metrics[k]:.4f}" for k in sorted(result.test_metrics) if k.startswith("mean.")),
        f"winning recipe: {out}",
    ]


def test_search_options_override_the_block_and_optuna_searches_the_scale_from_0_to_1():
    spec = parse_recipe(recipe("peaked", ["target"], search_block={"objective": "mean.accuracy", "trials": 9}))

    assert with_options(spec, "r.yaml") is spec
    optuna = with_options(spec, "r.yaml", strategy="optuna", trials=3, storage=None)
    assert (optuna.search.strategy, optuna.search.trials, optuna.search.objective) == ("optuna", 3, "mean.accuracy")
    assert (optuna.search.scale.low, optuna.search.scale.high) == (0.0, 1.0)
    assert spec.search.trials == 9  # the recipe itself is left as it was


def test_the_search_command_prints_the_winner_and_writes_its_recipe(store, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe("peaked", ["target"], search_block={"objective": "mean.accuracy"})), "utf-8")
    env = store.env(**store.files, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))

    (tmp_path / "out").mkdir()  # a side output creates no folder
    done = subprocess.run([CLI, "search", str(path), "--output-recipe", str(tmp_path / "out" / "best.yaml")], env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert "best: scale 0.35  weights [1.0]  objective 1.0000 (validation)" in done.stdout
    assert "Downloading artifacts" not in done.stderr  # no progress bars off a terminal
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text("utf-8"))
    assert best["scale"] == pytest.approx(0.35) and best["vectors"][0]["weight"] == 1.0


@pytest.mark.parametrize("stage", ["logging", "registering"])
def test_sigterm_while_the_winner_registers_never_leaves_a_ready_version_beside_a_failed_run(store, tmp_path, stage):
    import signal
    import time

    name = f"search-signal-{stage}"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe("peaked", ["target"], search_block={"objective": "mean.accuracy"})), "utf-8")
    release = tmp_path / "release"
    env = store.env(**store.files, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                    MLFLOW_TASKVEC_TEST_PAUSE=f"{stage}:{release}")
    proc = subprocess.Popen([CLI, "search", str(path), "--register", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not Path(f"{release}.reached").exists():  # the command reached the stage (signals.stage's test hook)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)

    proc.send_signal(signal.SIGTERM)
    release.touch()
    _, stderr = proc.communicate(timeout=300)

    assert proc.returncode == 128 + signal.SIGTERM, stderr
    versions = store.client.search_model_versions(f"name = '{name}'")
    if stage == "logging":  # before the version exists: nothing registered, the winner's run FAILED
        assert versions == []
        assert stderr.splitlines() == ["Error: interrupted by SIGTERM; temporary files were removed and no output was written"]
    else:  # the version exists: its registration completes and its (winner) run ends FINISHED first
        (version,) = versions
        assert version.status == "READY" and store.client.get_run(version.run_id).info.status == "FINISHED"
        assert stderr.splitlines() == [f"Error: interrupted by SIGTERM; it finished the registration first: models:/{name}/1 is complete "
                                       f"and its run {version.run_id} ended FINISHED"]


def test_the_search_command_refuses_a_recipe_without_evaluation(store, tmp_path):
    data = recipe("peaked", ["target"])
    del data["evaluation"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")

    done = subprocess.run([CLI, "search", str(path)], env=store.env(), capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert done.stderr.strip() == "Error: search needs an 'evaluation' block in the recipe (evaluator and tasks)"


def test_a_winner_from_another_worker_brings_its_runs_validation_metrics(store):
    from mlflow_taskvec.mlflow.search import Candidate, _pick

    with mlflow.start_run() as other:  # another worker's candidate run, in the shared tracking store
        mlflow.log_metrics({"target.accuracy": 0.75, "mean.accuracy": 0.75, "objective": 0.75})
    mine = Candidate(0, 0.5, [1.0], {}, metrics={"target.accuracy": 0.5}, objective=0.5, run_id="mine")
    shared = {"scale": 0.35, "weights": [1.0], "params": {}, "value": 0.75, "feasible": True, "run_id": other.info.run_id}

    best = _pick([mine], shared)

    assert (best.number, best.scale, best.objective, best.run_id) == (-1, 0.35, 0.75, other.info.run_id)
    assert best.metrics == {"target.accuracy": 0.75, "mean.accuracy": 0.75}
    # A run this worker cannot read (another tracking store, or deleted): the coefficients still win.
    unreadable = _pick([mine], {**shared, "run_id": "0" * 32})
    assert (unreadable.number, unreadable.scale, unreadable.metrics) == (-1, 0.35, {})
    # The study's best is this worker's own candidate: it is picked as it is.
    assert _pick([mine], {**shared, "run_id": "mine"}) is mine


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_optuna_with_the_same_seed_proposes_the_same_candidates_and_another_seed_others(store, sampler):
    def proposed(seed: int) -> list[tuple[float, tuple[float, ...]]]:
        block = {"strategy": "optuna", "sampler": sampler, "seed": seed, "trials": 5, "objective": "mean.accuracy",
                 "scale": {"low": 0.0, "high": 1.0}, "weights": {"low": 0.5, "high": 1.5}}
        result = search(parse_recipe(recipe("peaked", ["target"], search_block=block)))
        return [(c.scale, tuple(c.weights)) for c in result.candidates]

    first, again, other = proposed(3), proposed(3), proposed(4)

    assert len(first) == 5 and len(set(first)) == 5
    assert again == first
    assert other != first


def sparse_checkpoint(path: Path, numel: int) -> Path:
    """A valid safetensors file of one float32 tensor of ``numel`` entries whose data is a hole
    (a sparse file: no disk or memory is used until read)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode("utf-8")
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * numel)
    return path


def test_auto_memory_composes_in_memory_when_three_copies_fit_in_free_ram_else_streams(store, tmp_path):
    from mlflow_taskvec.mlflow.search import _fits_in_memory

    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    half_of_ram = sparse_checkpoint(tmp_path / "half-of-ram.safetensors", physical // 2 // 4)  # 3 copies: 1.5x all RAM
    small = sparse_checkpoint(tmp_path / "small.safetensors", 1024)

    assert open_checkpoint(half_of_ram).spec("w").numel == physical // 2 // 4
    assert _fits_in_memory(small) is True
    assert _fits_in_memory(half_of_ram) is False


def test_optuna_samples_a_methods_parameters_from_their_declared_ranges(store):
    block = {"strategy": "optuna", "trials": 10, "objective": "mean.accuracy", "scale": {"low": 0.2, "high": 1.0}, "params": "declared", "sampler": "random"}
    data = {**recipe("peaked", ["target"], search_block=block), "method": "breadcrumbs", "params": {"density": 0.5}}
    parsed = parse_recipe(data)
    assert {n: (r.low, r.high) for n, r in parsed.search.params.items()} == {"density": (5e-324, 1.0), "gamma": (0.0, math.nextafter(1.0, 0.0))}

    result = search(parsed)

    # a sampled pair with density + gamma > 1 is refused by the method's check and pruned, not composed
    assert 1 <= len(result.candidates) < 10
    for c in result.candidates:
        assert 0 < c.params["density"] <= 1 and 0 <= c.params["gamma"] < 1 and c.params["density"] + c.params["gamma"] <= 1
    assert len({c.params["gamma"] for c in result.candidates}) == len(result.candidates)
    assert len(children_of(store.client, result.run_id)) == len(result.candidates)
