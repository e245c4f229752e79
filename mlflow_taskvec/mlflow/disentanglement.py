"""``mlflow-taskvec disentanglement``: a recipe's pairs of task vectors, their weight
disentanglement error over a grid of coefficients, logged on an MLflow run.

The error is computed in memory by ``mlflow_taskvec.disentanglement`` (the formula is
there and in docs/disentanglement.md); this module resolves the recipe's inputs (its
policy first), builds the evaluation's module, and logs per pair ``disentanglement/
<I>__<J>.csv`` (the matrix: rows ``a_1``, columns ``a_2``), ``<I>__<J>.png`` (the
paper's heatmap) and the metrics ``disentanglement.<I>.<J>.unit_box_mean`` (the mean
over ``|a_1|, |a_2| <= 1``) and ``.grid_mean``; ``disentanglement.unit_box_mean`` averages the pairs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from mlflow_taskvec.disentanglement import (
    DEFAULT_HIGH,
    DEFAULT_LOW,
    DEFAULT_STEP,
    Disentanglement,
    coefficient_grid,
    disentanglement_error,
    pairs_of,
)
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import flavor
from mlflow_taskvec.mlflow.evaluate import composite_evaluation
from mlflow_taskvec.mlflow.inputs import resolve_inputs
from mlflow_taskvec.mlflow.runs import owned_run
from mlflow_taskvec.recipe import Recipe


@dataclass
class DisentanglementRun:
    results: list[Disentanglement]
    run_id: str
    linear: bool

    @property
    def unit_box_mean(self) -> float:
        return sum(r.unit_box_mean for r in self.results) / len(self.results)


def labels_of(evaluation) -> list[str]:
    """Each input's label: its task (a vector without one is refused: its inputs are that task's)."""
    labels = []
    for i, item in enumerate(evaluation.inputs):
        if not item.task:
            raise TaskVecError(f"vectors[{i}] has no task: give it 'task:' in the recipe (its task's inputs are the ones it is measured on)")
        labels.append(item.task if item.task not in labels else f"{item.task}{i}")
    return labels


def measure(recipe: Recipe, pair: tuple[str, str] | None = None, all_pairs: bool = False,
            grid: tuple[float, float, float] = (DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_STEP), split: str | None = None) -> DisentanglementRun:
    """The disentanglement error of the pairs asked for (``pair``: two inputs by position or task, or
    ``all_pairs``) over ``coefficient_grid(*grid)`` on the ``split`` inputs (default: the evaluation's),
    logged on a new run (see the module's docstring)."""
    alphas = coefficient_grid(*grid)
    if recipe.evaluation is None:
        raise TaskVecError("disentanglement needs an 'evaluation' block in the recipe (its evaluator hands out each task's inputs)")
    inputs = resolve_inputs(recipe)  # the policy first
    evaluation = composite_evaluation(inputs)
    unlabeled = getattr(evaluation.evaluator, "unlabeled", None)
    if not callable(unlabeled):
        raise TaskVecError(
            f"disentanglement needs each task's inputs: evaluator {evaluation.name!r} has no unlabeled(task, split) "
            "(give the evaluator an 'unlabeled' attribute that yields input batches)"
        )
    labels = labels_of(evaluation)
    pairs = pairs_of(labels, pair, all_pairs)
    linear = evaluation.linear
    split = split or recipe.evaluation.split
    base = flavor.read_state(inputs.base.path)
    module = evaluation.build_plain(base)  # linearized, when it is, by disentanglement_error
    tensors: dict[int, dict] = {}

    def vector(i: int) -> dict:
        if i not in tensors:
            item = evaluation.inputs[i]
            tensors[i] = {n: item.vector.get_tensor(n) for n in item.vector.names}
        return tensors[i]

    results = []
    with owned_run(None) as run, tempfile.TemporaryDirectory(prefix="taskvec-disentanglement-") as tmp:
        mlflow.log_params({
            "disentanglement.pairs": ", ".join(f"{labels[i]}+{labels[j]}" for i, j in pairs)[:500],
            "disentanglement.grid": f"{alphas[0]:g}..{alphas[-1]:g} ({len(alphas)} values)",
            "disentanglement.split": split,
            "disentanglement.fine_tuning": "linear" if linear else "standard",
            "base": inputs.base.canonical,
            **{f"input.{label}": r.canonical for label, r in zip(labels, inputs.vectors)},
        })
        folder = Path(tmp) / "disentanglement"
        folder.mkdir()
        for i, j in pairs:
            item_i, item_j = evaluation.inputs[i], evaluation.inputs[j]
            result = disentanglement_error(module, base, (vector(i), vector(j)), (labels[i], labels[j]), (item_i.task, item_j.task),
                                           unlabeled, split, alphas, linear=linear)
            results.append(result)
            stem = f"{labels[i]}__{labels[j]}"
            matrix_frame(result).to_csv(folder / f"{stem}.csv")
            plot_heatmap(result, folder / f"{stem}.png")
            mlflow.log_metrics({f"disentanglement.{labels[i]}.{labels[j]}.unit_box_mean": result.unit_box_mean,
                                f"disentanglement.{labels[i]}.{labels[j]}.grid_mean": result.grid_mean})
        outcome = DisentanglementRun(results, run.info.run_id, linear)
        mlflow.log_metric("disentanglement.unit_box_mean", outcome.unit_box_mean)
        mlflow.log_artifacts(str(folder), artifact_path="disentanglement")
    return outcome


def matrix_frame(result: Disentanglement) -> pd.DataFrame:
    """The matrix as a table: index ``a_1`` (the first input), columns ``a_2``."""
    a = [f"{x:g}" for x in result.alphas]
    return pd.DataFrame(result.error.numpy(), index=pd.Index(a, name=f"a1 ({result.labels[0]}) \\ a2 ({result.labels[1]})"), columns=a)


def plot_heatmap(result: Disentanglement, path: Path) -> None:
    """The paper's figure: ``xi`` over the grid, ``a_1`` on the x axis, the unit box outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    alphas = result.alphas
    lo, hi = alphas[0], alphas[-1]
    half = (alphas[1] - alphas[0]) / 2 if len(alphas) > 1 else 0.5
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=110)
    image = ax.imshow(result.error.numpy().T, origin="lower", cmap="viridis_r", vmin=0.0, vmax=max(1.0, float(result.error.max())),
                      extent=(lo - half, hi + half, lo - half, hi + half), aspect="equal")
    ax.add_patch(Rectangle((-1, -1), 2, 2, fill=False, ls="--", lw=1, color="white"))
    ax.set_xlabel(f"a1 ({result.labels[0]})")
    ax.set_ylabel(f"a2 ({result.labels[1]})")
    ax.set_title(f"weight disentanglement error, unit-box mean {result.unit_box_mean:.3f}", fontsize=9)
    fig.colorbar(image, ax=ax, label="xi (prediction disagreement)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
