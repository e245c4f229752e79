"""Weight disentanglement (Ortiz-Jimenez et al., "Task Arithmetic in the Tangent Space",
NeurIPS 2023, arXiv 2305.12827), computed in memory.

Two task vectors ``t_1``, ``t_2`` of tasks ``k = 1, 2`` are weight-disentangled when adding
both changes the model's predictions on each task's inputs no more than adding that task's
vector alone. The paper's disentanglement error, in its prediction-disagreement form:

    xi(a_1, a_2) = sum_{k=1,2} E_{x ~ task k} [ f(x; b + a_k t_k) != f(x; b + a_1 t_1 + a_2 t_2) ]

with ``f(x; w)`` the predicted class (the argmax of the logits) of the model with weights
``w``, and ``b`` the base. ``xi`` is 0 where the two vectors do not interfere, and at most 2.

The inputs of task ``k`` are the batches ``evaluator.unlabeled(task, split)`` yields (the
protocol AdaMerging reads; no label is read), each the arguments of the module's forward.
Vectors of linearized fine-tunes (``taskvec.fine_tuning=linear``) are evaluated in the
linearized model ``f(x; b) + J(b)(w - b)`` (``engine.linearize``), as they were trained.
The module is built once and called functionally (``torch.func.functional_call``) on each
grid point's weights, so no module or weight copy is made per point. No MLflow here: the
MLflow layer (``mlflow.disentanglement``) resolves the recipe and logs the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mlflow_taskvec.engine.linearize import MODEL_PREFIX, linearize
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.evaluation import call_args, logits_of

DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_STEP = -3.0, 3.0, 0.5


def coefficient_grid(low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH, step: float = DEFAULT_STEP) -> list[float]:
    """``low, low + step, ..., high`` (``high`` included when the step lands on it)."""
    for name, value in (("low", low), ("high", high), ("step", step)):
        if not math.isfinite(value):
            raise TaskVecError(f"disentanglement grid: {name} {value!r} is not a finite number")
    if step <= 0:
        raise TaskVecError(f"disentanglement grid: step {step:g} is not positive")
    if high < low:
        raise TaskVecError(f"disentanglement grid: high {high:g} is below low {low:g}")
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    if count > 201:
        raise TaskVecError(f"disentanglement grid: {count} coefficients from {low:g} to {high:g} step {step:g} (at most 201)")
    return [round(low + i * step, 10) for i in range(count)]


@dataclass
class Disentanglement:
    """``error[i, j]`` is ``xi(alphas[i], alphas[j])`` for the pair ``labels`` (``a_1`` on rows)."""

    labels: tuple[str, str]  # the two inputs, as the recipe names them
    tasks: tuple[str, str]  # whose inputs each term reads
    alphas: list[float]
    error: torch.Tensor  # float64, (len(alphas), len(alphas))
    terms: tuple[torch.Tensor, torch.Tensor]  # each task's disagreement; error = terms[0] + terms[1]
    inputs: tuple[int, int]  # how many inputs of each task were read

    def unit_box(self) -> torch.Tensor:
        """The mask of grid points with ``|a_1| <= 1`` and ``|a_2| <= 1``."""
        inside = torch.tensor([abs(a) <= 1.0 + 1e-12 for a in self.alphas])
        return inside[:, None] & inside[None, :]

    @property
    def unit_box_mean(self) -> float:
        """The mean of ``xi`` over the grid points in the unit box (nan when the grid has none)."""
        mask = self.unit_box()
        return float(self.error[mask].mean()) if bool(mask.any()) else math.nan

    @property
    def grid_mean(self) -> float:
        return float(self.error.mean())


def _batches(unlabeled: Callable, task: str, split: str) -> list:
    try:
        batches = list(unlabeled(task, split))
    except TaskVecError:
        raise
    except Exception as exc:  # the user's code: one line naming it
        raise TaskVecError(f"unlabeled({task!r}, {split!r}) failed: {type(exc).__name__}: {exc}") from None
    if not batches:
        raise TaskVecError(f"unlabeled({task!r}, {split!r}) yielded no batch")
    return batches


@torch.no_grad()
def predictions(module: torch.nn.Module, state: Mapping[str, torch.Tensor], batches: Iterable) -> torch.Tensor:
    """The predicted class of every input of ``batches`` for the module with weights ``state``."""
    out = []
    for batch in batches:
        args, kwargs = call_args(batch)
        logits = logits_of(torch.func.functional_call(module, dict(state), args, kwargs))
        out.append(logits.argmax(-1).reshape(-1))
    return torch.cat(out)


def disentanglement_error(
    module: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    vectors: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
    labels: tuple[str, str],
    tasks: tuple[str, str],
    unlabeled: Callable,
    split: str,
    alphas: Sequence[float],
    linear: bool = False,
) -> Disentanglement:
    """``xi`` (see the module's docstring) of ``vectors`` over ``alphas x alphas``.

    ``module`` is the architecture (its own weights are not read: every call gets a full
    state); ``base`` its base weights; ``vectors`` the two task vectors' tensors (a tensor
    a vector lacks is zero in it). With ``linear`` (vectors of linearized fine-tunes) every
    model is the module's first-order Taylor model around ``base`` (``engine.linearize``).
    """
    module = module.eval()
    prefix = ""
    if linear:
        module, prefix = linearize(module, base).eval(), MODEL_PREFIX
    names = sorted(set(vectors[0]) | set(vectors[1]))
    for name in names:
        if name not in base:
            raise TaskVecError(f"task vector tensor {name!r} is not a tensor of the base")
    fixed = {n: t for n, t in base.items() if n not in names}
    floats = {n: base[n].to(torch.float32) for n in names}

    def delta(k: int, name: str) -> torch.Tensor:
        t = vectors[k].get(name)
        return torch.zeros_like(floats[name]) if t is None else t.to(torch.float32)

    deltas = [{n: delta(k, n) for n in names} for k in (0, 1)]

    def state(a1: float, a2: float) -> dict[str, torch.Tensor]:
        merged = {n: (floats[n] + a1 * deltas[0][n] + a2 * deltas[1][n]).to(base[n].dtype) for n in names}
        return {prefix + n: t for n, t in {**fixed, **merged}.items()}

    batches = [_batches(unlabeled, task, split) for task in tasks]
    # each task's single-vector predictions, one per coefficient
    single = [[predictions(module, state(a, 0.0) if k == 0 else state(0.0, a), batches[k]) for a in alphas] for k in (0, 1)]
    size = len(alphas)
    terms = (torch.zeros(size, size, dtype=torch.float64), torch.zeros(size, size, dtype=torch.float64))
    for i, a1 in enumerate(alphas):
        for j, a2 in enumerate(alphas):
            weights = state(a1, a2)
            for k, own in ((0, i), (1, j)):
                both = predictions(module, weights, batches[k])
                terms[k][i, j] = (both != single[k][own]).double().mean()
    return Disentanglement(tuple(labels), tuple(tasks), [float(a) for a in alphas], terms[0] + terms[1], terms,
                           (len(single[0][0]), len(single[1][0])))


def pair_index(labels: Sequence[str], ref: str) -> int:
    """An input named by its position in the recipe (0-based) or its label (its task)."""
    if ref in labels:
        return list(labels).index(ref)
    try:
        index = int(ref)
    except ValueError:
        raise TaskVecError(f"--pair: {ref!r} is not an input of the recipe (inputs: {', '.join(labels)}, or 0-{len(labels) - 1})") from None
    if not 0 <= index < len(labels):
        raise TaskVecError(f"--pair: input {index} is out of range (the recipe has {len(labels)} vectors: 0-{len(labels) - 1})")
    return index


def pairs_of(labels: Sequence[str], pair: tuple[str, str] | None, all_pairs: bool) -> list[tuple[int, int]]:
    """The pairs asked for: ``pair`` (two inputs), or every pair with ``all_pairs``."""
    if all_pairs == (pair is not None):
        raise TaskVecError("give either --pair I J or --all-pairs")
    if all_pairs:
        if len(labels) < 2:
            raise TaskVecError(f"--all-pairs needs at least two vectors in the recipe (it has {len(labels)})")
        return [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    i, j = (pair_index(labels, ref) for ref in pair)
    if i == j:
        raise TaskVecError(f"--pair names input {labels[i]!r} twice: give two different vectors")
    return [(i, j)]
