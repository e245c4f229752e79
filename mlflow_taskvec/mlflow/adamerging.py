"""AdaMerging: task arithmetic's coefficients learned on unlabeled data (Yang et al., ICLR 2024, arXiv 2310.02575).

The composite is ``theta = base + sum_i lambda[i, layer] * s_i * t_i`` (``s_i`` the sign of
the recipe's weight of input ``i``; task-wise: one ``lambda[i]`` for every layer). The
coefficients are learned by Adam, minimizing the mean Shannon entropy
``H(p) = -sum_c p_c log p_c`` of the composite's predictions, averaged over the rows of a
batch and over the evaluated tasks, on inputs of each task's validation split that the
evaluator hands out without labels: ``evaluator.unlabeled(task, split)`` yields batches,
each the positional arguments of the module's forward (a tensor, or a tuple) or a dict of
its keyword arguments; the forward's output (or its ``.logits``) are the logits. The model
is evaluated functionally (``torch.func.functional_call`` on the merged tensors), so no
weights are copied into the module per step.

Layers: a tensor belongs to the first ``groups`` regex that matches its name (``re.search``),
and the match's first capture group (else the whole match) names its layer; by default one
layer per name prefix up to the layer index (``encoder.0.weight`` -> ``encoder.0``,
``model.layers.3.mlp.weight`` -> ``model.layers.3``; a name without an index is a layer of
its own). Tensors every task vector leaves at zero, and tensors in no group, keep ``init``.

The result is a recipe whose weights are per-layer glob mappings (``engine.coefficients``):
composing it again gives the learned model.
"""

from __future__ import annotations

import fnmatch
import glob
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlflow_taskvec.engine.coefficients import DEFAULT_GLOB, Coefficient
from mlflow_taskvec.engine.device import parse_device
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.evaluation import call_args as _as_call
from mlflow_taskvec.evaluation import logits_of as _logits
from mlflow_taskvec.recipe import AdaMerging

DEFAULT_GROUPS = (r"^(.*?\.\d+)(?:\.|$)", r"^.*$")  # up to the first layer index; else the whole name
TASKWISE = "all layers"


# -- what is learned ---------------------------------------------------------------------------


def layer_groups(names: list[str], patterns: list[str] | None) -> tuple[dict[str, list[str]], list[str]]:
    """``({layer: [tensor names]}, names in no layer)``, layers in the order their first tensor comes.

    A regex of ``patterns`` that matches no name is refused, naming it."""
    compiled = [re.compile(p) for p in (patterns or DEFAULT_GROUPS)]
    used = [False] * len(compiled)
    layers: dict[str, list[str]] = {}
    outside = []
    for name in names:
        for k, regex in enumerate(compiled):
            match = regex.search(name)
            if match:
                used[k] = True
                key = match.group(1) if regex.groups and match.group(1) is not None else match.group(0)
                layers.setdefault(key, []).append(name)
                break
        else:
            outside.append(name)
    if patterns:
        for k, (pattern, hit) in enumerate(zip(patterns, used)):
            if not hit:
                raise TaskVecError(f"search.adamerging.groups[{k}]: {pattern!r} matches no tensor name of the task vectors")
    return layers, outside


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean over rows of the Shannon entropy (nats) of ``softmax(logits)`` along the last dimension."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def _rows(batch, batch_size: int | None) -> Iterator:
    """``batch`` split along its tensors' first dimension into pieces of at most ``batch_size`` rows."""
    args, kwargs = _as_call(batch, None)
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if batch_size is None or not tensors or len(tensors[0]) <= batch_size:
        yield batch
        return
    total = len(tensors[0])
    for start in range(0, total, batch_size):
        cut = lambda v: v[start : start + batch_size] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == total else v  # noqa: E731
        if isinstance(batch, dict):
            yield {k: cut(v) for k, v in batch.items()}
        elif isinstance(batch, (tuple, list)):
            yield tuple(cut(v) for v in batch)
        else:
            yield cut(batch)


class _Batches:
    """An endless stream of one task's unlabeled batches: the evaluator's iterable, read again when it ends."""

    def __init__(self, unlabeled: Callable, task: str, split: str, batch_size: int | None):
        self.unlabeled, self.task, self.split, self.batch_size = unlabeled, task, split, batch_size
        self._it = None

    def epoch(self) -> Iterator:
        try:
            source = self.unlabeled(self.task, self.split)
            for batch in source:
                yield from _rows(batch, self.batch_size)
        except TaskVecError:
            raise
        except Exception as exc:  # the user's code: one line naming it
            raise TaskVecError(f"unlabeled({self.task!r}, {self.split!r}) failed: {type(exc).__name__}: {exc}") from None

    def next(self):
        for _ in range(2):
            if self._it is None:
                self._it = self.epoch()
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise TaskVecError(f"unlabeled({self.task!r}, {self.split!r}) yielded no batch")


@dataclass
class Learned:
    """What AdaMerging learned: ``coefficients[i, j]`` is ``lambda`` of input ``i`` in ``layers[j]``."""

    inputs: list[str]  # the inputs' labels
    tasks: list[str]  # the tasks whose entropy was minimized
    layers: list[str]
    tensors: dict[str, list[str]]  # layer -> its tensor names
    coefficients: torch.Tensor  # float64, (inputs, layers), before the signs
    signs: list[float]
    init: float
    entropy: list[float] = field(default_factory=list)  # the loss at each step, before its update
    initial_entropy: float = math.nan  # over every unlabeled batch, at init
    final_entropy: float = math.nan  # over every unlabeled batch, learned

    def weights(self, names: list[str]) -> list[Coefficient]:
        """Each input's weight: a number (task-wise), or ``{glob: lambda, ..., "*": init}`` per layer."""
        if self.layers == [TASKWISE]:
            return [s * float(self.coefficients[i, 0]) for i, s in enumerate(self.signs)]
        globs = {layer: _globs_of(members, names) for layer, members in self.tensors.items()}
        out = []
        for i, sign in enumerate(self.signs):
            mapping = {g: sign * float(self.coefficients[i, j]) for j, layer in enumerate(self.layers) for g in globs[layer]}
            mapping[DEFAULT_GLOB] = sign * self.init
            out.append(mapping)
        return out


def _globs_of(members: list[str], names: list[str]) -> list[str]:
    """Globs that match exactly ``members`` among ``names``: their common prefix with ``*`` when it
    matches nothing else (``encoder.0.*``), else each name, escaped."""
    prefix = members[0].rpartition(".")[0] if len(members) > 1 else None
    if prefix and all(m.startswith(prefix + ".") for m in members):
        pattern = glob.escape(prefix) + ".*"
        if sorted(n for n in names if fnmatch.fnmatchcase(n, pattern)) == sorted(members):
            return [pattern]
    return [glob.escape(m) for m in members]


def learn_coefficients(
    module: torch.nn.Module,
    base: dict[str, torch.Tensor],
    vectors: list[dict[str, torch.Tensor]],
    signs: list[float],
    inputs: list[str],
    unlabeled: Callable,
    tasks: list[str],
    split: str,
    settings: AdaMerging,
    on_step: Callable[[int, float, dict[str, float]], None] | None = None,
    quiet: bool = True,
) -> Learned:
    """Learn ``lambda`` (see the module's docstring); ``on_step(step, entropy, per_task)`` after each step."""
    device = parse_device(settings.device, "search.adamerging.device") or torch.device("cpu")
    names = sorted({n for v in vectors for n in v})
    moving = [n for n in names if any(bool(v[n].any()) for v in vectors if n in v)]  # all-zero tensors learn nothing
    if settings.layerwise:
        tensors, _ = layer_groups(moving, settings.groups)
    else:
        if settings.groups:
            layer_groups(moving, settings.groups)  # a regex that matches nothing is still refused
        tensors = {TASKWISE: moving}
    learned_names = [n for members in tensors.values() for n in members]
    if not learned_names:
        raise TaskVecError("adamerging: every task vector is zero, so there is no coefficient to learn")
    layers = list(tensors)
    layer_of = {n: j for j, layer in enumerate(layers) for n in tensors[layer]}
    sign = torch.tensor(signs, dtype=torch.float32, device=device)

    def stacked(name: str) -> torch.Tensor:
        ref = base[name]
        return torch.stack([(v[name] if name in v else torch.zeros_like(ref)).float() for v in vectors]).to(device)

    deltas = {n: stacked(n) for n in learned_names}
    fixed = {}  # tensors that keep init: computed once
    for n in names:
        if n not in layer_of:
            fixed[n] = base[n].float().to(device) + torch.tensordot(sign * settings.init, stacked(n), dims=1)
    base_on = {n: base[n].float().to(device) for n in learned_names}
    module = module.to(device).eval().requires_grad_(False)
    lam = torch.full((len(vectors), len(layers)), float(settings.init), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=settings.lr)
    streams = {t: _Batches(unlabeled, t, split, settings.batch_size) for t in tasks}

    def merged() -> dict[str, torch.Tensor]:
        coef = lam * sign[:, None]
        out = dict(fixed)
        for n in learned_names:
            out[n] = base_on[n] + torch.tensordot(coef[:, layer_of[n]], deltas[n], dims=1)
        return out

    def entropy_of(batch, state) -> torch.Tensor:
        args, kwargs = _as_call(batch, device)
        return prediction_entropy(_logits(torch.func.functional_call(module, state, args, kwargs)))

    def full_pass() -> float:
        with torch.no_grad():
            state = merged()
            per_task = []
            for t in tasks:
                values = [float(entropy_of(b, state)) for b in streams[t].epoch()]
                if not values:
                    raise TaskVecError(f"unlabeled({t!r}, {split!r}) yielded no batch")
                per_task.append(sum(values) / len(values))
            return sum(per_task) / len(per_task)

    result = Learned(inputs, list(tasks), layers, tensors, lam.detach().double().cpu(), list(signs), float(settings.init))
    result.initial_entropy = full_pass()
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, desc="adamerging", unit="step", leave=False, file=sys.stderr)
    caught = warnings.catch_warnings(record=True)
    shown = caught.__enter__()  # what torch warns about while learning: shown below only if the learning succeeds
    warnings.simplefilter("always")
    try:
        for step in range(settings.steps):
            optimizer.zero_grad()
            state = merged()
            per_task = {t: entropy_of(streams[t].next(), state) for t in tasks}
            loss = torch.stack(list(per_task.values())).mean()
            if not torch.isfinite(loss):
                raise TaskVecError(f"adamerging: the entropy became {float(loss)} at step {step} (try a smaller lr)")
            loss.backward()
            try:
                optimizer.step()
            except RuntimeError as exc:  # lr / (1 - beta1**t) beyond float32: torch refuses the update
                raise TaskVecError(f"adamerging: the Adam update at step {step} failed: {exc} (try a smaller lr)") from None
            if not bool(torch.isfinite(lam).all()):
                raise TaskVecError(f"adamerging: the coefficients became non-finite at step {step} (try a smaller lr)")
            loss = loss.detach()
            if settings.clamp is not None:
                with torch.no_grad():
                    lam.clamp_(*settings.clamp)
            result.entropy.append(float(loss))
            if on_step is not None:
                on_step(step, float(loss), {t: float(v.detach()) for t, v in per_task.items()})
            if bar is not None:
                bar.update(1)
    finally:
        caught.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    for w in shown:  # the learning succeeded: its warnings are worth a look; a failure's message says it all
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    result.coefficients = lam.detach().double().cpu()
    result.final_entropy = full_pass()
    return result


# -- pictures ------------------------------------------------------------------------------------


def plot_coefficients(learned: Learned, path: Path) -> None:
    """The learned ``lambda`` as a heatmap: one row per input (task), one column per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = learned.coefficients.numpy()
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(24, 4.5 + 0.55 * cols), 2.2 + 0.45 * rows), dpi=110)
    low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (float(values.min()), float(values.max()))
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high, aspect="auto")
    ax.set_xticks(range(cols), learned.layers, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(rows), learned.inputs, fontsize=8)
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < (low + high) / 2 else "black")
    fig.colorbar(image, ax=ax, label="lambda (before the weight's sign)")
    ax.set_title(f"AdaMerging coefficients, entropy {learned.initial_entropy:.3f} -> {learned.final_entropy:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_entropy(learned: Learned, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(range(len(learned.entropy)), learned.entropy, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("mean prediction entropy (nats)")
    ax.set_title("AdaMerging: entropy on unlabeled validation batches", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- inside a search run ---------------------------------------------------------------------------


def _settings(recipe) -> AdaMerging:
    """The recipe's AdaMerging settings; the learning runs on the recipe's device unless they name one."""
    settings = recipe.search.adamerging or AdaMerging()
    return settings if settings.device is not None else settings.model_copy(update={"device": recipe.device})


def check_can_learn(recipe, evaluation) -> None:
    """Refuse, before any run starts, what AdaMerging cannot learn from."""
    if getattr(evaluation.evaluator, "unlabeled", None) is None or not callable(evaluation.evaluator.unlabeled):
        raise TaskVecError(
            f"search strategy adamerging needs unlabeled inputs: evaluator {evaluation.name!r} has no unlabeled(task, split) "
            "(give the evaluator an 'unlabeled' attribute that yields input batches)"
        )
    if evaluation.linear:
        raise TaskVecError("search strategy adamerging does not learn coefficients of linearized fine-tunes' vectors (taskvec.fine_tuning=linear)")
    if recipe.method != "task_arithmetic":
        raise TaskVecError(f"search strategy adamerging learns task-arithmetic coefficients: the recipe's method is {recipe.method!r}")
    if any(isinstance(e.weight, dict) for e in recipe.vectors) or isinstance(recipe.scale, dict):
        raise TaskVecError("search strategy adamerging learns per-layer weights: give each vector a plain weight (its sign is kept)")
    settings = _settings(recipe)
    parse_device(settings.device, "search.adamerging.device")  # one that this machine lacks: refused now
    largest = torch.finfo(torch.float32).max
    if settings.lr > largest:
        raise TaskVecError(f"search.adamerging.lr: {settings.lr:g} is beyond the largest float32 ({largest:.3g}), the coefficients' dtype")
    if settings.groups:
        layer_groups(sorted({n for item in evaluation.inputs for n in item.vector.names}), settings.groups)


def learn_in_run(recipe, base_path: Path, evaluation, labels: list[str], folder: Path, quiet: bool = True) -> tuple[list[Coefficient], Learned]:
    """Learn the coefficients as ``recipe.search.adamerging`` says, logging to the active run:
    ``adamerging.entropy`` (and ``adamerging.entropy.<task>``) at every step, the initial and final
    entropy, and into ``folder`` the heatmap, the entropy curve and the coefficients as CSV."""
    import mlflow
    import pandas as pd

    from mlflow_taskvec.mlflow import flavor

    search = recipe.search
    settings = _settings(recipe)
    base = flavor.read_state(base_path)
    vectors = [{n: item.vector.get_tensor(n) for n in item.vector.names} for item in evaluation.inputs]
    signs = [-1.0 if e.weight < 0 else 1.0 for e in recipe.vectors]
    module = evaluation.build(base)

    def on_step(step: int, entropy: float, per_task: dict[str, float]) -> None:
        metrics = {"adamerging.entropy": entropy, **{f"adamerging.entropy.{t}": v for t, v in per_task.items()}}
        mlflow.log_metrics(metrics, step=step)

    learned = learn_coefficients(
        module, base, vectors, signs, labels, evaluation.evaluator.unlabeled, list(recipe.evaluation.tasks),
        search.validation_split, settings, on_step=on_step, quiet=quiet,
    )
    mlflow.log_metrics({"adamerging.initial_entropy": learned.initial_entropy, "adamerging.final_entropy": learned.final_entropy})
    plot_coefficients(learned, folder / "adamerging_coefficients.png")
    plot_entropy(learned, folder / "adamerging_entropy.png")
    table = pd.DataFrame(learned.coefficients.numpy(), index=pd.Index(labels, name="input"), columns=learned.layers)
    table.to_csv(folder / "adamerging_coefficients.csv")
    names = sorted({n for v in vectors for n in v})
    return learned.weights(names), learned
