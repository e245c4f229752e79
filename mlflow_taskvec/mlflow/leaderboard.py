"""A method leaderboard: every merge method's best composite of one recipe's inputs, side by side.

One parent run; per method a child run that searches that method's coefficients on the
validation split and evaluates its winner on the test split (the recipe's
``evaluation.split``), exactly as ``search`` does:

- a method without searchable parameters: the grid of the scale, 0.0 to 2.0 step 0.05;
- a method with searchable parameters (``MergeMethod.searchable_params()``: density, gamma,
  epsilon, ...): optuna over the scale in [0, 2] and each parameter's declared range (an
  open bound moved inside by 1% of the range), ``search.trials`` trials;
- ``adamerging``: task arithmetic with coefficients learned per task and layer on unlabeled
  inputs (``search.adamerging``).

The recipe's method and parameters are replaced per method; its evaluation and the rest of
its ``search`` block (objective, metric, validation split, trials, seed) are kept, so every
composite is scored by the same evaluator against the same cached reference metrics. The
parent run gets ``leaderboard/leaderboard.{md,csv,json}`` and a bar chart
``leaderboard/leaderboard.png``, and ``<method>.*`` metrics; with ``register_as`` the best
composite (by the test split's mean normalized metric, else its mean metric) is composed
and registered, or every method's with ``register_each`` (the best one gets the alias ``best``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from mlflow_taskvec.compose import compose
from mlflow_taskvec.engine.coefficients import describe
from mlflow_taskvec.engine.methods import METHODS, get_method
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow.inputs import resolve_inputs
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow.registry import Registered, check_destination, check_recipe_device, register_composite
from mlflow_taskvec.mlflow.runs import owned_run
from mlflow_taskvec.mlflow.search import SearchResult, search, with_options
from mlflow_taskvec.recipe import Range, Recipe, Search, load_recipe
from mlflow_taskvec.signals import extend_hold
from mlflow_taskvec.tables import render_table

ADAMERGING = "adamerging"
SCALE_HIGH = 2.0
SCALE_STEP = 0.05
BEST_ALIAS = "best"
ROLE_TAG = "taskvec.leaderboard.role"
METHOD_TAG = "taskvec.leaderboard.method"


def known_methods() -> list[str]:
    return [*METHODS, ADAMERGING]


def parse_methods(text: str) -> list[str]:
    """``"ties,tsv_m, adamerging"`` -> the list; an unknown or repeated name is refused, naming it."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise TaskVecError("--methods: name at least one method")
    for name in names:
        if name not in known_methods():
            raise TaskVecError(f"--methods: unknown method {name!r} (known: {', '.join(known_methods())})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TaskVecError(f"--methods: {repeated[0]!r} is listed twice")
    return names


def _searched_range(spec) -> Range:
    span = spec.high - spec.low
    low = spec.low + 0.01 * span if spec.low_open else spec.low
    high = spec.high - 0.01 * span if spec.high_open else spec.high
    return Range(low=low, high=high)


def method_recipe(recipe: Recipe, method: str) -> Recipe:
    """``recipe`` set up to search ``method``'s coefficients (see the module's docstring)."""
    kept = (recipe.search or Search()).model_dump(
        include={"objective", "metric", "validation_split", "control_min_ratio", "trials", "sampler", "seed", "adamerging"}
    )
    if method == ADAMERGING:
        settings = {**kept, "strategy": ADAMERGING}
        engine_method = "task_arithmetic"
    else:
        kept.pop("adamerging", None)
        engine_method = method
        searched = {spec.name: _searched_range(spec).model_dump() for spec in get_method(method).searchable_params() if spec.type is float}
        scale = {"low": 0.0, "high": SCALE_HIGH, "step": SCALE_STEP}
        settings = {**kept, "strategy": "optuna", "scale": scale, "params": searched} if searched else {**kept, "strategy": "grid", "scale": scale}
    params = dict(recipe.params) if recipe.method == engine_method else {}
    if method != ADAMERGING:
        # the searched parameters come from the search; the others keep the recipe's values or their defaults
        params = {k: v for k, v in params.items() if k not in settings.get("params", {})}
        for name in settings.get("params", {}):
            params[name] = settings["params"][name]["low"]  # a valid start for the recipe's own check
    scale = 1.0 if method == ADAMERGING or isinstance(recipe.scale, dict) else recipe.scale
    return recipe.derive(f"--methods {method}", method=engine_method, params=params, search=settings, scale=scale)


@dataclass
class Entry:
    method: str
    run_id: str
    result: SearchResult
    search_seconds: float
    compose_seconds: float
    registered: Registered | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.test_metrics


@dataclass
class Leaderboard:
    run_id: str
    entries: list[Entry]  # best first
    table: pd.DataFrame
    registered: list[Registered] = field(default_factory=list)

    @property
    def best(self) -> Entry:
        return self.entries[0]

    def render(self, fmt: str) -> str:
        """The table as ``mlflow-taskvec leaderboard`` prints it on stdout (see ``render``)."""
        return render(self.table, fmt)

    def lines(self) -> list[str]:
        """What the command says beside the table (on stderr): the run, the best method, the versions registered."""
        return [f"leaderboard run: {self.run_id}  best: {self.best.method}", *(reg.summary() for reg in self.registered)]


def _score(metrics: dict[str, float], metric: str) -> float:
    value = metrics.get(f"mean.normalized_{metric}", metrics.get(f"mean.{metric}", math.nan))
    return value if math.isfinite(value) else -math.inf


def _coefficients(result: SearchResult) -> str:
    recipe = result.recipe
    parts = [f"scale {describe(recipe.scale)}"]
    shown = {k: v for k, v in recipe.params.items() if v not in ([], None)}  # an empty exclude list says nothing
    if shown:
        parts.append(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    weights = [e.weight for e in recipe.vectors]
    if any(isinstance(w, dict) for w in weights):
        layers = [w for w in weights if isinstance(w, dict)]
        parts.append(f"weights per layer ({len(layers[0]) - 1} layers x {len(weights)} inputs)")
    elif any(w != 1.0 for w in weights):
        parts.append("weights " + ", ".join(f"{w:.3g}" for w in weights))
    return "; ".join(parts)


def _table(entries: list[Entry], recipe: Recipe, metric: str) -> pd.DataFrame:
    rows = []
    for rank, entry in enumerate(entries, 1):
        m = entry.metrics
        row = {
            "rank": rank,
            "method": entry.method,
            f"mean normalized {metric}": m.get(f"mean.normalized_{metric}", math.nan),
            f"mean {metric}": m.get(f"mean.{metric}", math.nan),
        }
        for task in recipe.evaluation.tasks:
            row[task] = m.get(f"{task}.{metric}", math.nan)
        for task in recipe.evaluation.control_tasks:
            row[f"control.{task}"] = m.get(f"control.{task}.{metric}", math.nan)
        row["coefficients"] = _coefficients(entry.result)
        row["compose s"] = entry.compose_seconds
        row["search s"] = entry.search_seconds
        row["run"] = entry.run_id
        rows.append(row)
    return pd.DataFrame(rows).set_index("rank")


def render(table: pd.DataFrame, fmt: str) -> str:
    """The leaderboard as ``markdown``, ``csv``, ``json`` or a plain ``table`` (the run ids in csv and json only)."""
    seconds = {c: 2 for c in table.columns if str(c).endswith(" s")}
    return render_table(table, fmt, digits=3, column_digits=seconds, hide=("run",), json_orient="records")


def plot(table: pd.DataFrame, metric: str, path: Path) -> None:
    """Bars per method: mean normalized and mean absolute metric on the test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table["method"])[::-1]  # the best on top
    normalized = list(table[f"mean normalized {metric}"])[::-1]
    absolute = list(table[f"mean {metric}"])[::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.55 * len(methods)), dpi=110)
    ys = range(len(methods))
    ax.barh([y + 0.2 for y in ys], normalized, height=0.38, label=f"mean normalized {metric}", color="#3b75af")
    ax.barh([y - 0.2 for y in ys], absolute, height=0.38, label=f"mean {metric}", color="#9cc3e4")
    for y, value in zip(ys, normalized):
        if math.isfinite(value):
            ax.text(value + 0.005, y + 0.2, f"{value:.3f}", va="center", fontsize=7)
    ax.set_yticks(list(ys), methods)
    ax.set_xlim(0, max([1.0, *[v for v in normalized + absolute if math.isfinite(v)]]) * 1.1)
    ax.set_xlabel(f"test split {metric}")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("method leaderboard", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _compose_seconds(winner: Recipe) -> float:
    """Wall time of composing the winner once, in memory, from its (cached) local inputs."""
    local = resolve_inputs(winner).local()
    start = time.perf_counter()
    compose(local)
    return time.perf_counter() - start


def leaderboard_recipe(recipe_path: "str | os.PathLike", methods: list[str], trials: int | None = None, **options) -> Leaderboard:
    """``leaderboard`` of the recipe file ``recipe_path``, with ``trials`` (if given) for each
    method's optuna search; ``options`` (``register_as``, ``memory``, ...) as for ``leaderboard``."""
    return leaderboard(with_options(load_recipe(recipe_path), recipe_path, trials=trials), methods, **options)


def leaderboard(
    recipe: Recipe,
    methods: list[str],
    register_as: str | None = None,
    register_each: bool = False,
    memory: str = "auto",
    quiet: bool = True,
    allow_mixed: bool = False,
) -> Leaderboard:
    """Search each of ``methods`` on ``recipe``'s inputs and rank their winners on the test split.

    A registered model ``register_as`` whose versions mlflow-taskvec did not make is refused
    (unless ``allow_mixed``) before the first method runs."""
    if recipe.evaluation is None:
        raise TaskVecError("leaderboard needs an 'evaluation' block in the recipe (evaluator and tasks)")
    if register_each and register_as is None:
        raise TaskVecError("--register-each needs --register NAME")
    check_recipe_device(recipe)  # before a run is started
    if register_as is not None:
        check_destination(register_as, allow_mixed)
    plans = {}
    for method in methods:  # every method's recipe checked before the first run starts
        if method not in known_methods():
            raise TaskVecError(f"--methods: unknown method {method!r} (known: {', '.join(known_methods())})")
        plans[method] = method_recipe(recipe, method)
    metric = (recipe.search or Search()).metric
    test_split = recipe.evaluation.split

    # From the first winner's version's creation on, a signal waits until the leaderboard's own run
    # has ended FINISHED too (signals.extend_hold: entered before that registration, left after this
    # run ends): every winner registers, the alias is set and the table is logged, then it stops.
    held_to_the_end = contextlib.ExitStack()
    with held_to_the_end, owned_run(None) as run, tempfile.TemporaryDirectory(prefix="taskvec-leaderboard-") as tmp:
        parent_id = run.info.run_id
        mlflow.set_tag(ROLE_TAG, "leaderboard")
        mlflow.log_params({"leaderboard.methods": ",".join(methods), "leaderboard.metric": metric, "leaderboard.test_split": test_split})
        entries = []
        for method in methods:
            with mlflow.start_run(run_name=f"method-{method}", nested=True, parent_run_id=parent_id) as child:
                mlflow.set_tags({ROLE_TAG: "method", METHOD_TAG: method})
                start = time.perf_counter()
                try:
                    result = search(plans[method], memory=memory, quiet=quiet)
                except TaskVecError as exc:
                    raise TaskVecError(f"leaderboard method {method}: {exc}") from None
                seconds = time.perf_counter() - start
                entries.append(Entry(method, child.info.run_id, result, seconds, _compose_seconds(result.recipe)))
        entries.sort(key=lambda e: _score(e.metrics, metric), reverse=True)

        registered = []
        if register_as is not None:
            held_to_the_end.enter_context(extend_hold())
            for entry in entries if register_each else entries[:1]:
                with mlflow.start_run(run_id=entry.run_id, nested=True), mlflow.start_run(
                    run_name="winner", nested=True, parent_run_id=entry.run_id
                ):  # signals.py: stages
                    mlflow.set_tag(ROLE_TAG, "winner")
                    entry.registered = register_composite(
                        entry.result.recipe, register_as, allow_mixed=allow_mixed,
                        extra_tags={tag.LEADERBOARD: json.dumps({"method": entry.method, "leaderboard_run_id": parent_id}, sort_keys=True)},
                        note=f"Winner of method `{entry.method}` in leaderboard run `{parent_id}` ({len(methods)} methods).",
                    )
                registered.append(entry.registered)
            if register_each:
                MlflowClient().set_registered_model_alias(register_as, BEST_ALIAS, entries[0].registered.version)

        table = _table(entries, recipe, metric)
        for entry in entries:
            if entry.registered is not None:
                table.loc[table["method"] == entry.method, "registered"] = entry.registered.version_uri
        folder = Path(tmp) / "leaderboard"
        folder.mkdir()
        (folder / "leaderboard.md").write_text(render(table, "markdown") + "\n", "utf-8")
        (folder / "leaderboard.csv").write_text(render(table, "csv"), "utf-8")
        (folder / "leaderboard.json").write_text(render(table, "json") + "\n", "utf-8")
        plot(table, metric, folder / "leaderboard.png")
        mlflow.log_artifacts(str(folder), artifact_path="leaderboard")
        scores = {}
        for entry in entries:
            for key in (f"mean.normalized_{metric}", f"mean.{metric}"):
                if key in entry.metrics:
                    scores[f"{entry.method}.{key}"] = entry.metrics[key]
            scores[f"{entry.method}.compose_seconds"] = entry.compose_seconds
        mlflow.log_metrics(scores)
        mlflow.set_tag("taskvec.leaderboard.best", entries[0].method)
    return Leaderboard(parent_id, entries, table, registered)
