"""``mlflow-taskvec disentanglement``: the weight disentanglement error of pairs of task vectors.

A real sqlite store holds the digits example's small MLP (hidden 16) and three real
fine-tunes of its encoder, registered as task vectors (real safetensors files). The
error is checked against a plain reference computed here from the paper's formula, one
freshly loaded module per grid point:

    xi(a1, a2) = sum_k mean_{x in task k} [argmax f(x; b + a_k t_k) != argmax f(x; b + a1 t1 + a2 t2)]

The evaluator ``adamerging_evaluators:guarded`` raises if a label of any split but the
test split is read: the measure on the validation split reads none.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow_helpers import BASE_NAME, digits_tasks, mlflow_store, register_trained_vectors, run_artifact, template_db, tiny_net, vector_name
from safetensors.torch import load_file

import adamerging_evaluators
from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.disentanglement import coefficient_grid, disentanglement_error
from mlflow_taskvec.mlflow.disentanglement import measure
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.recipe import parse_recipe

TASKS = ("parity", "large", "mod3")
SPLIT = "validation"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("disentanglement"), template_db(tmp_path_factory)) as store:
        register_trained_vectors(TASKS, steps=40, lr=3e-2)
        yield store


def recipe(tasks=TASKS, evaluator: str = "adamerging_evaluators:guarded", **evaluation) -> dict:
    return {
        "base": f"models:/{BASE_NAME}/1",
        "vectors": [{"vector": f"models:/{vector_name(t)}/1", "weight": 1.0} for t in tasks],
        "evaluation": {"evaluator": evaluator, "tasks": list(tasks), "split": SPLIT, **evaluation},
    }


def stored(ref: str) -> dict[str, torch.Tensor]:
    """The tensors of a registered version, read from its safetensors file."""
    path = resolve(ref).path
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def reference_xi(base: dict, t1: dict, t2: dict, tasks, alphas) -> torch.Tensor:
    """The paper's formula, a fresh module loaded per model."""

    def predict(a1: float, a2: float, task: str) -> torch.Tensor:
        state = {n: w + a1 * t1.get(n, torch.zeros_like(w)) + a2 * t2.get(n, torch.zeros_like(w)) for n, w in base.items()}
        net = tiny_net(0)
        net.load_state_dict(state)
        x, _ = digits_tasks.load_task(task, SPLIT)
        with torch.no_grad():
            return net(x, task).argmax(1)

    xi = torch.zeros(len(alphas), len(alphas), dtype=torch.float64)
    for (i, a1), (j, a2) in itertools.product(enumerate(alphas), enumerate(alphas)):
        xi[i, j] = (predict(a1, a2, tasks[0]) != predict(a1, 0.0, tasks[0])).double().mean() + (
            predict(a1, a2, tasks[1]) != predict(0.0, a2, tasks[1])
        ).double().mean()
    return xi


def test_the_grid_runs_from_low_to_high_by_step():
    assert coefficient_grid() == [-3.0 + 0.5 * i for i in range(13)]
    assert coefficient_grid(-1, 1, 0.5) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert coefficient_grid(0, 1, 0.3) == [0.0, 0.3, 0.6, 0.9]


def test_the_error_matches_the_formula_on_the_default_grid(store):
    base = {n: t.clone() for n, t in tiny_net(0).state_dict().items()}
    t1, t2 = stored(f"models:/{vector_name('parity')}/1"), stored(f"models:/{vector_name('large')}/1")
    alphas = coefficient_grid()
    adamerging_evaluators.LABEL_READS.clear()
    result = disentanglement_error(tiny_net(0), base, (t1, t2), ("parity", "large"), ("parity", "large"),
                                   adamerging_evaluators.guarded.unlabeled, SPLIT, alphas)
    assert adamerging_evaluators.LABEL_READS == []
    want = reference_xi(base, t1, t2, ("parity", "large"), alphas)
    assert result.error.shape == (13, 13)
    assert torch.equal(result.error, want)
    assert torch.equal(result.terms[0] + result.terms[1], result.error)
    zero = alphas.index(0.0)
    # with a_2 = 0 the composite is task 1's own model (no disagreement on task 1), and the same for task 2
    assert float(result.terms[0][:, zero].max()) == 0.0 and float(result.terms[1][zero, :].max()) == 0.0
    assert float(result.error[zero, zero]) == 0.0
    assert 0.0 < float(result.error.max()) <= 2.0
    inside = [i for i, a in enumerate(alphas) if abs(a) <= 1]
    assert result.unit_box_mean == pytest.approx(float(want[inside][:, inside].mean()), abs=1e-12)
    assert result.inputs == (359, 359)


def test_the_command_logs_the_matrix_the_heatmap_and_the_unit_box_mean(store, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(), sort_keys=False), "utf-8")
    result = CliRunner().invoke(cli, ["disentanglement", str(path), "--pair", "parity", "2", "--low", "-1", "--high", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("parity + mod3: unit-box mean ") and "5x5 points, 359 + 359 inputs" in lines[0]
    run_id = lines[1].split()[2]
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["disentanglement.fine_tuning"] == "standard"
    assert run.data.params["disentanglement.split"] == SPLIT
    assert run.data.params["disentanglement.grid"] == "-1..1 (5 values)"

    base = {n: t.clone() for n, t in tiny_net(0).state_dict().items()}
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    want = reference_xi(base, stored(f"models:/{vector_name('parity')}/1"), stored(f"models:/{vector_name('mod3')}/1"), ("parity", "mod3"), alphas)
    assert run.data.metrics["disentanglement.parity.mod3.unit_box_mean"] == pytest.approx(float(want.mean()), abs=1e-12)
    assert run.data.metrics["disentanglement.unit_box_mean"] == pytest.approx(float(want.mean()), abs=1e-12)
    assert f"unit-box mean {float(want.mean()):.4f}" in lines[0]
    with open(run_artifact(store.client, run_id, "disentanglement/parity__mod3.csv"), newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == ["-1", "-0.5", "0", "0.5", "1"] and [r[0] for r in rows[1:]] == ["-1", "-0.5", "0", "0.5", "1"]
    logged = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float64)
    assert torch.allclose(logged, want, atol=1e-12, rtol=0)
    image = matplotlib.image.imread(run_artifact(store.client, run_id, "disentanglement/parity__mod3.png"))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


def test_all_pairs_measures_every_pair_of_the_recipe(store):
    run = measure(parse_recipe(recipe()), all_pairs=True, grid=(0.0, 1.0, 1.0))
    assert [r.labels for r in run.results] == [("parity", "large"), ("parity", "mod3"), ("large", "mod3")]
    metrics = store.client.get_run(run.run_id).data.metrics
    for r in run.results:
        assert metrics[f"disentanglement.{r.labels[0]}.{r.labels[1]}.unit_box_mean"] == pytest.approx(r.unit_box_mean)
        assert r.error.shape == (2, 2) and float(r.error[0, 0]) == 0.0
    assert metrics["disentanglement.unit_box_mean"] == pytest.approx(sum(r.unit_box_mean for r in run.results) / 3)


def refused(tmp_path: Path, data: dict, *args: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
    result = CliRunner().invoke(cli, ["disentanglement", str(path), *args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "data, args, fragment",
    [
        (recipe(), ["--pair", "parity", "loop"], "--pair: 'loop' is not an input of the recipe (inputs: parity, large, mod3, or 0-2)"),
        (recipe(), ["--pair", "0", "3"], "--pair: input 3 is out of range (the recipe has 3 vectors: 0-2)"),
        (recipe(), ["--pair", "parity", "0"], "--pair names input 'parity' twice"),
        (recipe(), [], "give either --pair I J or --all-pairs"),
        (recipe(), ["--pair", "0", "1", "--all-pairs"], "give either --pair I J or --all-pairs"),
        (recipe(("parity",)), ["--all-pairs"], "--all-pairs needs at least two vectors in the recipe (it has 1)"),
        (recipe(), ["--all-pairs", "--step", "0"], "disentanglement grid: step 0 is not positive"),
        (recipe(), ["--all-pairs", "--low", "1", "--high", "-1"], "disentanglement grid: high -1 is below low 1"),
        (recipe(evaluator="search_evaluators:peaked"), ["--all-pairs"], "evaluator 'search_evaluators:peaked' has no unlabeled(task, split)"),
        ({k: v for k, v in recipe().items() if k != "evaluation"}, ["--all-pairs"], "disentanglement needs an 'evaluation' block"),
    ],
)
def test_bad_input_is_one_line_and_no_run(store, tmp_path, data, args, fragment):
    before = len(store.client.search_runs([store.experiment_id]))
    assert fragment in refused(tmp_path, data, *args)
    assert len(store.client.search_runs([store.experiment_id])) == before
