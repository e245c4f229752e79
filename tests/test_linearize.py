"""Linearized fine-tuning: ``mlflow_taskvec.linearize`` and task vectors of linearized fine-tunes.

``linearize(module)`` is checked against a plain reference: the Jacobian of the module's
output with respect to its weights, computed column by column in float64, times ``w - b``.
On a real sqlite store, real linearized fine-tunes of the digits example's MLP (hidden 16)
register with ``taskvec.fine_tuning=linear``; a composite of them is evaluated in the
linearized model and records it in its tags and description; the disentanglement error of
a pair of them is the formula's on linearized models.
"""

from __future__ import annotations

import copy
import itertools

import mlflow
import pytest
import torch
from mlflow_helpers import BASE_NAME, digits_tasks, log_checkpoint, mlflow_store, signature_for, template_db, tiny_net

import adamerging_evaluators
import mlflow_taskvec
from mlflow_taskvec.disentanglement import disentanglement_error
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow.disentanglement import measure
from mlflow_taskvec.mlflow.downloads import resolve
from mlflow_taskvec.mlflow.registry import register_composite, register_task_vector
from mlflow_taskvec.mlflow.search import search
from mlflow_taskvec.modelcard import LINEAR_NOTE
from mlflow_taskvec.recipe import parse_recipe

TASKS = ("parity", "large")


def reference_taylor(net: torch.nn.Module, base: dict, weights: dict, x: torch.Tensor, task: str) -> torch.Tensor:
    """``f(x; b) + sum_p J_p (w_p - b_p)``: each weight's full Jacobian at ``b`` (float64), times its change."""
    net = copy.deepcopy(net).double()
    names = [n for n, _ in net.named_parameters()]
    b = {n: base[n].double() for n in names}
    out0 = torch.func.functional_call(net, b, (x.double(), task))
    total = out0.clone()
    for n in names:
        def f(v, n=n):
            return torch.func.functional_call(net, {**b, n: v}, (x.double(), task))

        jacobian = torch.autograd.functional.jacobian(f, b[n])  # out0.shape + b[n].shape
        total += (jacobian.reshape(out0.numel(), -1) @ (weights[n].double() - b[n]).reshape(-1)).reshape(out0.shape)
    return total


def test_linearize_is_the_first_order_taylor_model_around_the_base():
    assert mlflow_taskvec.linearize is mlflow_taskvec.engine.linearize.linearize
    net = tiny_net(0)
    base = {n: t.clone() for n, t in net.state_dict().items()}
    x, _ = digits_tasks.load_task("parity", "validation")
    x = x[:6]
    lin = mlflow_taskvec.linearize(net)
    assert torch.equal(lin(x, "parity"), net(x, "parity"))  # at w = b: f(x; b)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    weights = {n: t.clone() for n, t in net.state_dict().items()}
    want = reference_taylor(net, base, weights, x, "parity")
    got = lin(x, "parity").double()
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    # the linearized model is not the model: a second-order difference remains
    assert (net(x, "parity").double() - want).abs().max() > 1e-4
    # the wrapped module's weights are w, under their own names; the base is not in the state dict
    assert list(lin.model.state_dict()) == list(base) and all(torch.equal(lin.model.state_dict()[n], weights[n]) for n in base)
    assert torch.equal(lin.base["encoder.0.weight"], base["encoder.0.weight"])
    assert lin.double().base["encoder.0.weight"].dtype == torch.float64


def test_training_the_linearized_model_moves_the_weights_and_lowers_the_loss():
    net = tiny_net(0)
    before = {n: t.clone() for n, t in net.state_dict().items()}
    x, y = digits_tasks.load_task("parity", "train")
    lin = mlflow_taskvec.linearize(copy.deepcopy(net))
    start = float(torch.nn.functional.cross_entropy(lin(x, "parity"), y).detach())
    trained = digits_tasks.train(copy.deepcopy(net), "parity", steps=30, lr=0.05, optimizer="sgd", mode="linear")
    after = digits_tasks.linearized(trained, net)
    assert float(torch.nn.functional.cross_entropy(after(x, "parity"), y).detach()) < start - 0.05
    moved = {n for n, t in trained.state_dict().items() if not torch.equal(t, before[n])}
    assert moved == {n for n in before if n.startswith("encoder.")}  # the heads stay frozen
    with pytest.raises(ValueError, match="unknown mode 'tangent'"):
        digits_tasks.train(copy.deepcopy(net), "parity", steps=1, mode="tangent")


# -- in the registry -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("linearize"), template_db(tmp_path_factory)) as store:
        base_net = tiny_net(0)
        with mlflow.start_run(run_name="pretrain"):
            log_checkpoint(base_net, "base", registered_model_name=BASE_NAME, signature=signature_for(base_net))
        base = resolve(f"models:/{BASE_NAME}/1")
        store.nets = {}
        for task, mode in itertools.product(TASKS, ("linear", "standard")):
            net = digits_tasks.train(copy.deepcopy(base_net), task, steps=40, lr=0.05, optimizer="sgd", mode=mode)
            with mlflow.start_run(run_name=f"finetune-{task}-{mode}"):
                info = log_checkpoint(net, "finetuned")
            ft = resolve(info.model_uri)
            register_task_vector(TaskVector.extract(base.path, ft.path, task=task), f"{mode}-{task}-vector", base, ft, fine_tuning=mode)
            store.nets[task, mode] = net
        store.base_net = base_net
        yield store


def recipe(mode: str = "linear", tasks=TASKS, scale: float = 0.5, **extra) -> dict:
    return {
        "base": f"models:/{BASE_NAME}/1",
        "scale": scale,
        "vectors": [{"vector": f"models:/{mode}-{t}-vector/1", "weight": 1.0} for t in tasks],
        "evaluation": {"evaluator": "adamerging_evaluators:guarded", "tasks": list(tasks), "split": "test"},
        **extra,
    }


def test_linear_vectors_are_tagged_and_standard_ones_are_not(store):
    linear = store.client.get_model_version("linear-parity-vector", "1")
    standard = store.client.get_model_version("standard-parity-vector", "1")
    assert linear.tags["taskvec.fine_tuning"] == "linear"
    assert "taskvec.fine_tuning" not in standard.tags  # as before: a standard vector's tags are unchanged


def test_a_composite_of_linear_vectors_is_evaluated_linearized_and_says_so(store):
    reg = register_composite(parse_recipe(recipe()), "linear-composite")
    version = store.client.get_model_version("linear-composite", reg.version)
    assert version.tags["taskvec.fine_tuning"] == "linear"
    assert LINEAR_NOTE in version.description
    metrics = store.client.get_run(reg.run_id).data.metrics
    # by hand: b + 0.5 (t_parity + t_large), in the Taylor model around b
    base = {n: t for n, t in store.base_net.state_dict().items()}
    weights = {n: base[n] + 0.5 * sum(store.nets[t, "linear"].state_dict()[n] - base[n] for t in TASKS) for n in base}
    net = tiny_net(0)
    net.load_state_dict(weights)
    lin = digits_tasks.linearized(net, store.base_net)
    for task in TASKS:
        assert metrics[f"{task}.accuracy"] == pytest.approx(digits_tasks.accuracy(lin, task), abs=1e-9)
        # the reference fine-tune is the linear fine-tune, linearized
        own = digits_tasks.linearized(store.nets[task, "linear"], store.base_net)
        assert metrics[f"{task}.finetuned_accuracy"] == pytest.approx(digits_tasks.accuracy(own, task), abs=1e-9)
    standard = register_composite(parse_recipe(recipe("standard")), "standard-composite")
    assert "taskvec.fine_tuning" not in store.client.get_model_version("standard-composite", standard.version).tags


def test_the_disentanglement_of_linear_vectors_is_measured_in_the_linearized_model(store):
    run = measure(parse_recipe(recipe()), pair=("parity", "large"), grid=(-1.0, 1.0, 1.0), split="validation")
    assert run.linear and store.client.get_run(run.run_id).data.params["disentanglement.fine_tuning"] == "linear"
    base = {n: t.clone() for n, t in store.base_net.state_dict().items()}
    t = [{n: store.nets[k, "linear"].state_dict()[n] - base[n] for n in base} for k in TASKS]
    alphas = [-1.0, 0.0, 1.0]

    def predict(a1, a2, task):
        net = tiny_net(0)
        net.load_state_dict({n: base[n] + a1 * t[0][n] + a2 * t[1][n] for n in base})
        x, _ = digits_tasks.load_task(task, "validation")
        with torch.no_grad():
            return digits_tasks.linearized(net, store.base_net)(x, task).argmax(1)

    want = torch.zeros(3, 3, dtype=torch.float64)
    for (i, a1), (j, a2) in itertools.product(enumerate(alphas), enumerate(alphas)):
        want[i, j] = (predict(a1, a2, "parity") != predict(a1, 0, "parity")).double().mean() + (
            predict(a1, a2, "large") != predict(0, a2, "large")
        ).double().mean()
    assert torch.allclose(run.results[0].error, want, atol=0, rtol=0)
    plain = disentanglement_error(tiny_net(0), base, tuple(t), TASKS, TASKS, adamerging_evaluators.guarded.unlabeled, "validation", alphas)
    assert not torch.equal(plain.error, want)  # the non-linearized models disagree otherwise


def test_linear_and_standard_vectors_do_not_mix_and_adamerging_refuses_linear_ones(store):
    mixed = recipe()
    mixed["vectors"][1]["vector"] = "models:/standard-large-vector/1"
    with pytest.raises(TaskVecError, match="mixes task vectors of linearized and standard fine-tunes"):
        register_composite(parse_recipe(mixed), "never-mixed")
    assert store.client.search_model_versions("name='never-mixed'") == []
    with pytest.raises(TaskVecError, match="adamerging does not learn coefficients of linearized fine-tunes' vectors"):
        search(parse_recipe(recipe(search={"strategy": "adamerging"})))
    with pytest.raises(TaskVecError, match="fine_tuning 'tangent' is not one of standard, linear"):
        base = resolve(f"models:/{BASE_NAME}/1")
        register_task_vector(TaskVector.extract(base.path, base.path), "never-vector", base, base, fine_tuning="tangent")
