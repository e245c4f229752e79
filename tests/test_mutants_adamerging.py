"""AdaMerging's documented options against a reference written from docs/search.md.

``learn_coefficients`` on a small two-layer network (plus a head every vector leaves at zero)
is compared with a plain float64 loop written from the formula: ``lambda`` starts at
``init``; each step composes ``base + sum_i lambda[i, layer] * s_i * t_i``, takes one piece
of at most ``batch_size`` rows of each task's unlabeled batches (the batches read again when
they end), minimizes the mean over tasks of the mean row entropy ``-sum_c p_c log p_c`` with
Adam, and clamps ``lambda`` to ``clamp`` unless it is null. These tests kill the mutants of
``mlflow/adamerging.py`` that ``make mutation`` found alive (docs/mutation.md).
"""

from __future__ import annotations

import itertools
import sys
import warnings

import pytest
import torch

from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow.adamerging import TASKWISE, _globs_of, _rows, layer_groups, learn_coefficients, prediction_entropy
from mlflow_taskvec.recipe import AdaMerging

TASKS = ("even", "odd")
IN, HIDDEN, OUT = 3, 4, 3


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(IN, HIDDEN), torch.nn.Linear(HIDDEN, OUT)])
        self.head = torch.nn.Linear(OUT, OUT)

    def forward(self, x):
        return self.head(self.layers[1](torch.tanh(self.layers[0](x))))


def weights(seed: int, std: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * std for n, p in Net().named_parameters()}


BASE = weights(0)
VECTORS = [{n: t for n, t in weights(seed, 0.8).items() if not n.startswith("head.")} | {"head.weight": torch.zeros(OUT, OUT)} for seed in (1, 2)]
BATCHES = {
    t: [torch.randn(5, IN, generator=torch.Generator().manual_seed(10 + k + 5 * j)) for j in range(2)]
    for k, t in enumerate(TASKS)
}


def unlabeled(task, split):
    assert split == "validation"
    return iter(BATCHES[task])


def forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ state["layers.0.weight"].T + state["layers.0.bias"])
    h = h @ state["layers.1.weight"].T + state["layers.1.bias"]
    return h @ state["head.weight"].T + state["head.bias"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, dim=-1)
    return (-(p * torch.log(p)).sum(-1)).mean()


def reference(signs, *, steps, lr, init, clamp, batch_size, layer_of, losses=None) -> tuple[torch.Tensor, float, float]:
    """lambda after ``steps`` steps, and the entropy over every piece before and after, in float64;
    ``losses`` (a list) gets each step's ``(loss, {task: entropy})`` before its update."""
    layers = sorted(set(layer_of.values()))
    lam = torch.full((len(VECTORS), len(layers)), float(init), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=lr)

    def state() -> dict[str, torch.Tensor]:
        out = {}
        for n, b in BASE.items():
            out[n] = b.double()
            for i, v in enumerate(VECTORS):
                if n in v:
                    coef = lam[i, layers.index(layer_of[n])] if n in layer_of else torch.tensor(float(init), dtype=torch.float64)
                    out[n] = out[n] + coef * signs[i] * v[n].double()
        return out

    def pieces(task):
        size = batch_size or 10**9
        return [x[s : s + size].double() for x in BATCHES[task] for s in range(0, len(x), size)]

    def over_all() -> float:
        with torch.no_grad():
            s = state()
            return sum(sum(float(entropy(forward(s, x))) for x in pieces(t)) / len(pieces(t)) for t in TASKS) / len(TASKS)

    before = over_all()
    streams = {t: itertools.cycle(pieces(t)) for t in TASKS}
    for _ in range(steps):
        optimizer.zero_grad()
        s = state()
        per_task = {t: entropy(forward(s, next(streams[t]))) for t in TASKS}
        loss = sum(per_task.values()) / len(TASKS)
        if losses is not None:
            losses.append((float(loss), {t: float(v) for t, v in per_task.items()}))
        loss.backward()
        optimizer.step()
        if clamp is not None:
            with torch.no_grad():
                lam.clamp_(*clamp)
    return lam.detach(), before, over_all()


LAYERWISE = {n: n.rpartition(".")[0] for n in ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias")}


def base_net() -> Net:
    """The module as ``evaluation.build(base)`` gives it: the base's weights (the head's bias no vector names)."""
    net = Net()
    net.load_state_dict(BASE)
    return net


def learn(signs=(1.0, -1.0), **settings):
    return learn_coefficients(base_net(), BASE, VECTORS, list(signs), ["a", "b"], unlabeled, list(TASKS), "validation", AdaMerging(**settings))


@pytest.mark.parametrize(
    "settings",
    [
        dict(steps=6, lr=0.05, init=0.3, clamp=None, batch_size=None),
        dict(steps=6, lr=0.05, init=0.3, clamp=None, batch_size=3),
        dict(steps=5, lr=0.2, init=0.5, clamp=(0.4, 0.6), batch_size=2),
    ],
    ids=["whole-batches", "batch_size-3", "clamp-0.4-0.6"],
)
@pytest.mark.parametrize("signs", [(1.0, -1.0), (-1.0, 1.0)], ids=["signs+-", "signs-+"])
def test_layerwise_coefficients_equal_the_reference_for_signs_batch_size_and_clamp(settings, signs):
    learned = learn(signs, **settings)
    assert learned.layers == ["layers.0", "layers.1"]  # the head: every vector leaves it at zero
    expected, before, after = reference(signs, layer_of=LAYERWISE, **settings)
    assert torch.allclose(learned.coefficients, expected, atol=2e-5, rtol=0)
    assert learned.initial_entropy == pytest.approx(before, abs=1e-5) and learned.final_entropy == pytest.approx(after, abs=1e-5)
    assert len(learned.entropy) == settings["steps"] and learned.signs == list(signs) and learned.init == settings["init"]


def test_the_reference_itself_depends_on_sign_batch_size_and_clamp():
    """The rows above tell the options apart: each one changes the reference's result."""
    plain = dict(steps=6, lr=0.05, init=0.3, clamp=None, batch_size=None, layer_of=LAYERWISE)
    lam, *_ = reference((1.0, -1.0), **plain)
    assert not torch.allclose(lam, reference((1.0, 1.0), **plain)[0], atol=1e-3)
    assert not torch.allclose(lam, reference((1.0, -1.0), **(plain | dict(batch_size=3)))[0], atol=1e-3)
    assert not torch.allclose(lam, reference((1.0, -1.0), **(plain | dict(clamp=(0.29, 0.31))))[0], atol=1e-3)


def test_task_wise_learns_one_coefficient_per_input_for_every_layer():
    settings = dict(steps=6, lr=0.05, init=0.3, clamp=None, batch_size=None)
    learned = learn(layerwise=False, **settings)
    assert learned.layers == [TASKWISE] and learned.tensors[TASKWISE] == sorted(LAYERWISE)
    expected, *_ = reference((1.0, -1.0), layer_of={n: "all" for n in LAYERWISE}, **settings)
    assert torch.allclose(learned.coefficients, expected, atol=2e-5, rtol=0)


def test_tensors_in_no_group_keep_init_times_the_sign():
    settings = dict(steps=5, lr=0.05, init=0.4, clamp=None, batch_size=None)
    learned = learn(groups=[r"^(layers\.0)\."], **settings)
    assert learned.layers == ["layers.0"] and learned.tensors == {"layers.0": ["layers.0.bias", "layers.0.weight"]}
    expected, *_ = reference((1.0, -1.0), layer_of={"layers.0.weight": "layers.0", "layers.0.bias": "layers.0"}, **settings)
    assert torch.allclose(learned.coefficients, expected, atol=2e-5, rtol=0)
    weights = learned.weights(sorted(BASE))
    assert weights[0] == {"layers.0.*": pytest.approx(float(learned.coefficients[0, 0])), "*": 0.4}
    assert weights[1] == {"layers.0.*": pytest.approx(-float(learned.coefficients[1, 0])), "*": -0.4}


def test_the_default_layers_are_the_name_prefixes_up_to_the_layer_index():
    names = ["encoder.0.weight", "encoder.0.bias", "model.layers.3.mlp.weight", "model.layers.12", "head.weight", "norm"]
    layers, outside = layer_groups(names, None)
    assert layers == {"encoder.0": ["encoder.0.weight", "encoder.0.bias"], "model.layers.3": ["model.layers.3.mlp.weight"],
                      "model.layers.12": ["model.layers.12"], "head.weight": ["head.weight"], "norm": ["norm"]}
    assert outside == []
    layers, outside = layer_groups(names, [r"^encoder\.\d+", r"^(model)\.layers\.\d+\.mlp"])
    assert layers == {"encoder.0": ["encoder.0.weight", "encoder.0.bias"], "model": ["model.layers.3.mlp.weight"]}
    assert outside == ["model.layers.12", "head.weight", "norm"]


def test_a_group_regex_that_matches_nothing_is_refused_naming_its_position():
    with pytest.raises(TaskVecError, match=r"^search\.adamerging\.groups\[1\]: 'nothing' matches no tensor name of the task vectors$"):
        layer_groups(["a.0.w"], [r"a", "nothing"])
    with pytest.raises(TaskVecError, match=r"groups\[0\]: 'nothing' matches no tensor name"):
        learn(layerwise=False, groups=["nothing"], steps=1)


def test_all_zero_vectors_are_refused_in_one_line():
    zero = [{n: torch.zeros_like(t) for n, t in v.items()} for v in VECTORS]
    with pytest.raises(TaskVecError, match=r"^adamerging: every task vector is zero, so there is no coefficient to learn$"):
        learn_coefficients(base_net(), BASE, zero, [1.0, 1.0], ["a", "b"], unlabeled, list(TASKS), "validation", AdaMerging(steps=1))


def test_an_unlabeled_source_that_fails_or_yields_nothing_is_one_line_naming_the_task():
    def failing(task, split):
        raise OSError("disk gone")

    with pytest.raises(TaskVecError, match=r"^unlabeled\('even', 'validation'\) failed: OSError: disk gone$"):
        learn_coefficients(base_net(), BASE, VECTORS, [1.0, 1.0], ["a", "b"], failing, list(TASKS), "validation", AdaMerging(steps=1))
    with pytest.raises(TaskVecError, match=r"^unlabeled\('even', 'validation'\) yielded no batch$"):
        learn_coefficients(base_net(), BASE, VECTORS, [1.0, 1.0], ["a", "b"], lambda t, s: iter(()), list(TASKS), "validation", AdaMerging(steps=1))


def test_a_huge_lr_is_refused_in_one_line_naming_the_step():
    with pytest.raises(TaskVecError, match=r"^adamerging: .* at step \d+ .*\(try a smaller lr\)$"):
        learn(steps=3, lr=1e38, clamp=None)


def test_pieces_of_a_batch_keep_what_has_no_rows_and_cut_only_tensors_of_the_batch_s_length():
    x = torch.arange(10.0).reshape(5, 2)
    other = torch.arange(3.0)  # rows, but not the batch's count: passed whole
    pieces = list(_rows((x, other, 7), 2))
    assert [tuple(p[0].shape) for p in pieces] == [(2, 2), (2, 2), (1, 2)]
    assert all(p[1] is other and p[2] == 7 for p in pieces)
    assert torch.equal(torch.cat([p[0] for p in pieces]), x)
    assert [len(p) for p in _rows(x, 2)] == [2, 2, 1] and list(_rows(x, 5))[0] is x


def test_a_layer_s_glob_is_its_prefix_only_when_that_matches_exactly_its_members():
    names = ["enc.0.w", "enc.0.b", "enc.0.extra", "enc.1.w"]
    assert _globs_of(["enc.1.w"], names) == ["enc.1.w"]
    assert _globs_of(["enc.0.w", "enc.0.b", "enc.0.extra"], names) == ["enc.0.*"]
    assert _globs_of(["enc.0.w", "enc.0.b"], names) == ["enc.0.w", "enc.0.b"]  # enc.0.* would also match enc.0.extra
    assert _globs_of(["a[1].w", "a[1].b"], ["a[1].w", "a[1].b"]) == ["a[[]1].*"]


def test_a_batch_of_one_dimensional_rows_is_cut_too_and_a_zero_d_tensor_first_is_passed_whole():
    labels = torch.arange(5.0)  # one value per row
    assert [p.tolist() for p in _rows(labels, 2)] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    x = torch.arange(10.0).reshape(5, 2)
    pieces = list(_rows({"gain": torch.tensor(2.0), "x": x, "ids": labels}, 3))
    assert [len(p["x"]) for p in pieces] == [3, 2] and [p["ids"].tolist() for p in pieces] == [[0.0, 1.0, 2.0], [3.0, 4.0]]
    assert all(float(p["gain"]) == 2.0 for p in pieces)


def test_the_entropy_is_taken_over_the_last_dimension_of_sequence_logits():
    """Logits of shape (batch, positions, classes): the mean over batch and positions of each softmax's entropy."""
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = []
    for i in range(2):
        for j in range(3):
            p = [float(v) for v in torch.exp(logits[i, j]) / torch.exp(logits[i, j]).sum()]
            rows.append(-sum(q * torch.log(torch.tensor(q)).item() for q in p))
    assert float(prediction_entropy(logits)) == pytest.approx(sum(rows) / len(rows), abs=1e-6)


def test_a_device_that_does_not_exist_is_refused_naming_the_setting_and_cpu_or_auto_learn_the_same():
    with pytest.raises(TaskVecError, match=r"^search\.adamerging\.device: 'cuda:999' (needs a CUDA GPU|does not exist)"):
        learn(steps=1, device="cuda:999")
    settings = dict(steps=3, lr=0.05, init=0.3, clamp=None, batch_size=None)
    expected, *_ = reference((1.0, -1.0), layer_of=LAYERWISE, **settings)
    for device in ("cpu", None) + (() if torch.cuda.is_available() else ("auto",)):
        assert torch.allclose(learn(device=device, **settings).coefficients, expected, atol=2e-5, rtol=0), device


def test_a_tensor_an_input_lacks_counts_as_zero_for_that_input(monkeypatch):
    lacking = [VECTORS[0], {n: t for n, t in VECTORS[1].items() if n != "layers.1.bias"}]
    monkeypatch.setattr(sys.modules[__name__], "VECTORS", lacking)  # what learn() and reference() read
    settings = dict(steps=5, lr=0.05, init=0.3, clamp=None, batch_size=None)
    learned = learn(**settings)
    expected, *_ = reference((1.0, -1.0), layer_of=LAYERWISE, **settings)  # the reference adds nothing for a missing tensor
    assert torch.allclose(learned.coefficients, expected, atol=2e-5, rtol=0)


def test_an_unlabeled_source_that_yields_only_once_is_refused_when_it_is_read_again():
    once = iter(BATCHES["even"])  # a one-shot iterator: the evaluator hands out the same one every time

    def unlabeled_once(task, split):
        return once if task == "even" else iter(BATCHES[task])

    with pytest.raises(TaskVecError, match=r"^unlabeled\('even', 'validation'\) yielded no batch$"):
        learn_coefficients(base_net(), BASE, VECTORS, [1.0, 1.0], ["a", "b"], unlabeled_once, list(TASKS), "validation", AdaMerging(steps=2))


class KeywordNet(Net):
    def forward(self, *, x):
        return super().forward(x)


def test_dict_batches_are_the_forward_s_keyword_arguments_and_the_result_names_inputs_and_tasks():
    net = KeywordNet()
    net.load_state_dict(BASE)
    settings = dict(steps=4, lr=0.05, init=0.3, clamp=None, batch_size=2)
    learned = learn_coefficients(net, BASE, VECTORS, [1.0, -1.0], ["first", "second"], lambda t, s: ({"x": x} for x in BATCHES[t]),
                                 list(TASKS), "validation", AdaMerging(**settings))
    expected, *_ = reference((1.0, -1.0), layer_of=LAYERWISE, **settings)
    assert torch.allclose(learned.coefficients, expected, atol=2e-5, rtol=0)
    assert learned.inputs == ["first", "second"] and learned.tasks == list(TASKS)


def test_an_entropy_that_is_not_finite_is_refused_naming_the_step():
    nan_batches = {t: [torch.full((2, IN), float("nan"))] for t in TASKS}
    with pytest.raises(TaskVecError, match=r"^adamerging: the entropy became nan at step 0 \(try a smaller lr\)$"):
        learn_coefficients(base_net(), BASE, VECTORS, [1.0, 1.0], ["a", "b"], lambda t, s: iter(nan_batches[t]), list(TASKS), "validation", AdaMerging(steps=2))


def test_each_step_reports_the_loss_before_its_update_and_each_task_s_entropy():
    settings = dict(steps=4, lr=0.05, init=0.3, clamp=None, batch_size=3)
    seen = []
    learned = learn_coefficients(base_net(), BASE, VECTORS, [1.0, -1.0], ["a", "b"], unlabeled, list(TASKS), "validation",
                                 AdaMerging(**settings), on_step=lambda step, loss, per_task: seen.append((step, loss, per_task)))
    losses = []
    reference((1.0, -1.0), layer_of=LAYERWISE, losses=losses, **settings)
    assert [step for step, _, _ in seen] == [0, 1, 2, 3]
    assert learned.entropy == pytest.approx([loss for loss, _ in losses], abs=1e-5)
    for (_, loss, per_task), (expected, expected_tasks) in zip(seen, losses):
        assert loss == pytest.approx(expected, abs=1e-5) and per_task == pytest.approx(expected_tasks, abs=1e-5)


class WarningNet(Net):
    def forward(self, x):
        warnings.warn("a warning from the module's forward", RuntimeWarning)
        return super().forward(x)


def test_what_warns_while_learning_is_shown_once_the_learning_succeeds():
    net = WarningNet()
    net.load_state_dict(BASE)
    with pytest.warns(RuntimeWarning, match="^a warning from the module's forward$") as record:
        learn_coefficients(net, BASE, VECTORS, [1.0, 1.0], ["a", "b"], unlabeled, list(TASKS), "validation", AdaMerging(steps=2))
    shown = [w for w in record if w.category is RuntimeWarning]
    assert shown and all(str(w.message) == "a warning from the module's forward" and w.filename == __file__ for w in shown)
