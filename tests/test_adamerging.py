"""Search strategy ``adamerging``: coefficients learned per task and layer on unlabeled inputs.

A real sqlite store holds the digits example's small MLP (hidden 16) and two real
fine-tunes of its encoder (``parity`` and ``large``, a few Adam steps each). The
evaluator ``adamerging_evaluators:guarded`` raises if any split's labels but the
test split's are read.
"""

from __future__ import annotations

import csv
import json
import io
from pathlib import Path

import matplotlib.image
import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow_helpers import BASE_NAME, digits_tasks, mlflow_store, register_trained_vectors, run_artifact, template_db, tiny_net, vector_name

import adamerging_evaluators
from mlflow_taskvec.cli import main as cli
from mlflow_taskvec.engine.merging import merge
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.mlflow import flavor
from mlflow_taskvec.mlflow.adamerging import TASKWISE, Learned, _rows, layer_groups, learn_coefficients, prediction_entropy
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.search import search
from mlflow_taskvec.recipe import parse_recipe
from team_server import needs_cuda

TASKS = ("parity", "large")
STEPS = 30
LR = 0.02


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("adamerging"), template_db(tmp_path_factory)) as store:
        register_trained_vectors(TASKS)
        yield store


def recipe(evaluator: str = "adamerging_evaluators:guarded", **adamerging) -> dict:
    return {
        "base": f"models:/{BASE_NAME}/1",
        "vectors": [{"vector": f"models:/{vector_name(t)}/1", "weight": 1.0} for t in TASKS],
        "evaluation": {"evaluator": evaluator, "tasks": list(TASKS)},
        "search": {"strategy": "adamerging", "adamerging": {"steps": STEPS, "lr": LR, **adamerging}},
    }


def entropy_reference(state: dict[str, torch.Tensor], split: str = "validation") -> float:
    """The mean over tasks of the mean over inputs of -sum_c p_c log p_c, in float64, from the formula."""
    net = tiny_net(0).double()
    net.load_state_dict({n: t.double() for n, t in state.items()})
    values = []
    with torch.no_grad():
        for task in TASKS:
            p = torch.softmax(net(digits_tasks.load_task(task, split)[0].double(), task), dim=1)
            values.append(float((-(p * torch.log(p)).sum(1)).mean()))
    return sum(values) / len(values)


def composed(winner) -> dict[str, torch.Tensor]:
    base = resolve(winner.base).path
    vectors = [TaskVector.load(resolve(e.ref).path) for e in winner.vectors]
    return merge(base, vectors, [e.weight for e in winner.vectors], scale=winner.scale)


@pytest.fixture(scope="module")
def learned(store):
    adamerging_evaluators.LABEL_READS.clear()
    result = search(parse_recipe(recipe()), register_as="digits-adamerged")
    return result, list(adamerging_evaluators.LABEL_READS)


def test_adamerging_lowers_the_mean_prediction_entropy_it_minimizes(learned):
    result, _ = learned
    history = mlflow.tracking.MlflowClient().get_metric_history(result.run_id, "adamerging.entropy")
    run = mlflow.get_run(result.run_id)
    start = entropy_reference(composed(result.recipe.model_copy(update={"vectors": [
        e.model_copy(update={"weight": 0.3}) for e in result.recipe.vectors]})))

    assert [m.step for m in history] == list(range(STEPS))
    assert history[-1].value < history[0].value
    # the initial and final figures are the formula's, in float64, on the composites they name
    assert run.data.metrics["adamerging.initial_entropy"] == pytest.approx(start, abs=1e-4)
    assert run.data.metrics["adamerging.final_entropy"] == pytest.approx(entropy_reference(composed(result.recipe)), abs=1e-4)
    assert run.data.metrics["adamerging.final_entropy"] < start - 0.01
    assert set(run.data.metrics) >= {f"adamerging.entropy.{t}" for t in TASKS}


def test_adamerging_never_reads_a_label_before_the_test_split(learned):
    result, reads = learned

    assert reads, "the winner was evaluated on the test split"
    assert {split for _, split in reads} == {"test"}
    assert result.best.metrics == {"entropy": result.best.metrics["entropy"], "initial_entropy": result.best.metrics["initial_entropy"]}


def test_the_result_is_a_recipe_with_a_coefficient_per_task_and_layer(learned, store):
    result, _ = learned
    client = mlflow.tracking.MlflowClient()
    table = list(csv.reader(io.StringIO(run_artifact(client, result.run_id, "search/adamerging_coefficients.csv").read_text())))
    heatmap = matplotlib.image.imread(run_artifact(client, result.run_id, "search/adamerging_coefficients.png"))

    # the frozen heads' vectors are zero: only the encoder's two linear layers are learned
    assert table[0] == ["input", "encoder.0", "encoder.2"]
    assert [row[0] for row in table[1:]] == list(TASKS)
    for entry, row in zip(result.recipe.vectors, table[1:]):
        assert list(entry.weight) == ["encoder.0.*", "encoder.2.*", "*"]
        assert [entry.weight["encoder.0.*"], entry.weight["encoder.2.*"]] == pytest.approx([float(v) for v in row[1:]], abs=1e-12)
        assert entry.weight["*"] == 0.3
        assert all(0.0 <= float(v) <= 1.0 for v in row[1:])  # the default clamp
    assert any(abs(float(v) - 0.3) > 1e-3 for row in table[1:] for v in row[1:])  # it moved
    assert result.recipe.scale == 1.0 and result.recipe.search is None
    assert heatmap.shape[0] > 100 and heatmap.shape[1] > 200


def test_the_learned_recipe_reproduces_its_registered_metrics_when_composed_again(learned):
    result, _ = learned
    version = result.registered
    run = mlflow.get_run(version.run_id)
    net = tiny_net(0)
    net.load_state_dict(composed(result.recipe))

    again = {f"{t}.accuracy": digits_tasks.accuracy(net, t, "test") for t in TASKS}

    assert again == {k: run.data.metrics[k] for k in again}
    assert result.test_metrics == run.data.metrics
    description = mlflow.tracking.MlflowClient().get_model_version("digits-adamerged", version.version).description
    assert "AdaMerging (layer-wise, 30 Adam steps at lr 0.02, no labels read)" in description
    weight = result.recipe.vectors[0].weight
    assert f"| 1 | {json.dumps(weight)} |" in description
    # its lineage picture is drawn with per-layer weights on its arrows
    assert run_artifact(mlflow.tracking.MlflowClient(), version.run_id, "lineage.png").read_bytes()[:4] == b"\x89PNG"
    verified = CliRunner().invoke(cli, ["verify", version.version_uri, "-q"])
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith(f"verified: {version.version_uri} (composite")


def test_task_wise_adamerging_learns_one_plain_weight_per_task(store):
    result = search(parse_recipe(recipe(layerwise=False, steps=5, batch_size=100)))
    table = run_artifact(mlflow.tracking.MlflowClient(), result.run_id, "search/adamerging_coefficients.csv").read_text().splitlines()

    assert all(isinstance(e.weight, float) for e in result.recipe.vectors)
    assert table[0] == "input,all layers"
    assert [float(line.split(",")[1]) for line in table[1:]] == pytest.approx([e.weight for e in result.recipe.vectors], abs=1e-12)


def test_layer_groups_follow_the_first_matching_regex_and_its_capture():
    names = ["model.layers.0.attn.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.embed.weight", "lm_head.weight"]

    assert layer_groups(names, None) == (
        {"model.layers.0": names[:2], "model.layers.1": [names[2]], "model.embed.weight": [names[3]], "lm_head.weight": [names[4]]},
        [],
    )
    assert layer_groups(names, [r"\.(mlp|attn)\."]) == ({"attn": [names[0]], "mlp": names[1:3]}, names[3:])


def test_prediction_entropy_is_the_mean_shannon_entropy_of_the_softmax():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [1.0, 2.0]])
    p = torch.softmax(logits.double(), 1)

    assert float(prediction_entropy(logits)) == pytest.approx(float((-(p * p.log()).sum(1)).mean()), abs=1e-6)
    assert float(prediction_entropy(logits[:1])) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


# -- bad input -------------------------------------------------------------------------------


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
    return path


def refused(tmp_path: Path, data: dict) -> str:
    result = CliRunner().invoke(cli, ["search", str(write(tmp_path, data))])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), (result.stderr, repr(result.exception))
    return lines[0]


@pytest.mark.parametrize(
    "data, fragment",
    [
        (recipe("search_evaluators:peaked"), "evaluator 'search_evaluators:peaked' has no unlabeled(task, split)"),
        (recipe(steps=0), "search.adamerging.steps: 0: Input should be greater than or equal to 1"),
        (recipe(lr=0), "search.adamerging.lr: 0.0: Input should be greater than 0"),
        (recipe(lr=-0.01), "search.adamerging.lr: -0.01: Input should be greater than 0"),
        (recipe(groups=[r"encoder\.\d+", r"decoder\."]), r"search.adamerging.groups[1]: 'decoder\\.' matches no tensor name of the task vectors"),
        (recipe(groups=["encoder.(["]), "search.adamerging.groups: [0] 'encoder.([' is not a regular expression"),
        (recipe(clamp=[1, 0]), "search.adamerging.clamp: [1.0, 0.0] is not [low, high] with low <= high"),
        ({**recipe(), "method": "ties", "params": {"density": 0.5}}, "adamerging learns task-arithmetic coefficients: the recipe's method is 'ties'"),
        (recipe("adamerging_evaluators:no_batches"), "unlabeled('parity', 'validation') yielded no batch"),
        (recipe(device="tpu"), "search.adamerging.device: 'tpu' is not one of cpu, cuda, cuda:N or auto"),
        (recipe(lr=1e39), "search.adamerging.lr: 1e+39 is beyond the largest float32 (3.4e+38)"),
        (recipe(lr=1e38, clamp=None), "(try a smaller lr)"),
    ],
    ids=["no-unlabeled", "steps-0", "lr-0", "lr-negative", "group-matches-nothing", "group-not-a-regex", "clamp-reversed", "not-task-arithmetic", "no-batches", "unknown-device",
         "lr-beyond-float32", "lr-huge"],
)
def test_bad_adamerging_input_is_one_line_and_registers_nothing(store, tmp_path, data, fragment):
    client = mlflow.tracking.MlflowClient()
    runs_before = {r.info.run_id for r in client.search_runs([store.experiment_id])}
    versions_before = len(client.search_model_versions())

    message = refused(tmp_path, data)

    assert fragment in message
    new_runs = [r for r in client.search_runs([store.experiment_id]) if r.info.run_id not in runs_before]
    # refused before a run starts; a failure found only while learning (no batches) leaves its run FAILED
    assert [r.info.status for r in new_runs] == (["FAILED"] if "yielded no batch" in fragment or "smaller lr" in fragment else [])
    assert len(client.search_model_versions()) == versions_before


# -- pinned: batch_size and the weights' signs -----------------------------------------------------


def test_batch_size_splits_every_batch_into_pieces_of_at_most_that_many_rows():
    x = torch.arange(20.0).reshape(10, 2)
    pieces = list(_rows(x, 3))
    assert [len(p) for p in pieces] == [3, 3, 3, 1] and torch.equal(torch.cat(pieces), x)
    as_dict = list(_rows({"x": x, "mode": "a", "gain": torch.tensor(2.0)}, 4))
    assert [len(p["x"]) for p in as_dict] == [4, 4, 2]
    assert all(p["mode"] == "a" and float(p["gain"]) == 2.0 for p in as_dict)  # what has no rows is passed whole
    as_tuple = list(_rows((x, x * 2), 6))
    assert [tuple(len(v) for v in p) for p in as_tuple] == [(6, 6), (4, 4)] and torch.equal(as_tuple[1][1], x[6:] * 2)
    assert list(_rows(x, None))[0] is x and list(_rows(x, 10))[0] is x


def test_the_learned_weights_carry_each_input_s_sign():
    taskwise = Learned(["a", "b"], ["t"], [TASKWISE], {TASKWISE: ["w"]}, torch.tensor([[0.25], [0.5]], dtype=torch.float64), [-1.0, 1.0], 0.3)
    assert taskwise.weights(["w"]) == [-0.25, 0.5]
    layers = {"l0": ["l0.w", "l0.b"], "l1": ["l1.w"]}
    layerwise = Learned(["a", "b"], ["t"], ["l0", "l1"], layers, torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64), [-1.0, 1.0], 0.3)
    first, second = layerwise.weights(["l0.w", "l0.b", "l1.w"])
    assert sorted(first.values()) == pytest.approx([-0.3, -0.2, -0.1]) and sorted(second.values()) == pytest.approx([0.3, 0.3, 0.4])
    assert first["*"] == pytest.approx(-0.3) and second["*"] == pytest.approx(0.3)


def test_a_negative_input_weight_stays_negative_in_what_adamerging_learns(store):
    spec = recipe(layerwise=False, steps=5)
    spec["vectors"][1]["weight"] = -1.0
    result = search(parse_recipe(spec))
    learned = [e.weight for e in result.recipe.vectors]
    assert learned[0] > 0 and learned[1] < 0


# -- pinned: clamp null and the device -------------------------------------------------------------


def learn_from_store(module: torch.nn.Module | None = None, **adamerging) -> Learned:
    """``learn_coefficients`` on the store's base and real fine-tunes' vectors, with the settings a
    recipe's ``search.adamerging`` block gives (``guarded``'s unlabeled inputs, both tasks)."""
    settings = parse_recipe(recipe(**adamerging)).search.adamerging
    base = flavor.read_state(resolve(f"models:/{BASE_NAME}/1").path)
    vectors = [{n: v.get_tensor(n) for n in v.names} for v in (TaskVector.load(resolve(f"models:/{vector_name(t)}/1").path) for t in TASKS)]
    unlabeled = adamerging_evaluators.guarded.unlabeled
    return learn_coefficients(module or tiny_net(0), base, vectors, [1.0, 1.0], list(TASKS), unlabeled, list(TASKS), "validation", settings)


def test_clamp_null_leaves_the_coefficients_unbounded(store):
    # Adam's first step moves every coefficient by lr * g / (|g| + eps), that is by lr up or down:
    # from init 0.3 with lr 1 to 1.3 or -0.7, both outside the default clamp [0, 1]
    unbounded = learn_from_store(steps=1, lr=1.0, clamp=None).coefficients
    clamped = learn_from_store(steps=1, lr=1.0).coefficients

    assert unbounded.shape == (2, 2)
    assert ((unbounded - 0.3).abs() - 1.0).abs().max() < 1e-3
    assert torch.equal(clamped, unbounded.clamp(0.0, 1.0))


@pytest.mark.parametrize("device", ["cpu", "auto", pytest.param("cuda", marks=needs_cuda)])
def test_adamerging_learns_on_the_device_it_names(store, device):
    seen = set()
    module = tiny_net(0)
    module.encoder[0].register_forward_pre_hook(lambda layer, args: seen.add((args[0].device.type, layer.weight.device.type)))

    learned = learn_from_store(module, layerwise=False, steps=3, device=device)

    expected = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    assert seen == {(expected, expected)}  # the inputs and the merged weights, at every forward
    on_cpu = learn_from_store(layerwise=False, steps=3)  # no device: the recipe's, here none, so the cpu
    assert learned.coefficients.device.type == "cpu"
    if expected == "cpu":
        assert torch.equal(learned.coefficients, on_cpu.coefficients)
    else:
        torch.testing.assert_close(learned.coefficients, on_cpu.coefficients, atol=1e-4, rtol=0)
