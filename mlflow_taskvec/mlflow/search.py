"""Coefficient search: pick a composite's scale, weights and method parameters.

The paper's protocol by default: a grid over the scale (0.0 to 1.0, step 0.05),
each candidate evaluated on a validation split, the best one by an objective
evaluated once more on the test split. Beyond it: optuna (TPE or random) over
the scale, each vector's weight and the method's parameters, with optuna's RDB
storage so several workers can share one study.

Every candidate is a child run of the search's run, with its coefficients as
params and its validation metrics. Candidates are composed in memory when the
model fits (streamed to a temporary folder otherwise) and never written to the
artifact store; the search's run gets ``search/candidates.csv``, a plot of the
objective against the scale, and the winning recipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.compose import base_with_adapter, compose, compose_to, compose_to_adapter
from mlflow_taskvec.engine.checkpoint import open_checkpoint
from mlflow_taskvec.engine.coefficients import Coefficient, describe, values_of
from mlflow_taskvec.engine.methods import get_method, validate_params
from mlflow_taskvec.engine.output import check_output_path, write_text
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow.evaluate import CompositeEvaluation, composite_evaluation
from mlflow_taskvec.mlflow.inputs import Inputs, resolve_inputs
from mlflow_taskvec.mlflow.registry import Registered, check_destination, check_recipe_device, register_composite
from mlflow_taskvec.mlflow.runs import owned_run
from mlflow_taskvec.progress import progress_bar
from mlflow_taskvec.recipe import AdaMerging, Recipe, Search, load_recipe
from mlflow_taskvec.references import local_paths
from mlflow_taskvec.signals import extend_hold, stages_owned_by

MEMORY_MODES = ("auto", "memory", "streamed")
CANDIDATE = "search candidate"  # owns a candidate's temporary writes, which mark none of the command's stages (signals.stages_owned_by)


@dataclass
class Objective:
    """What a candidate is scored by; ``score(metrics) -> (value, feasible)``, higher is better."""

    kind: str  # mean_normalized | negation | analogy | metric
    key: str  # the metric read
    describe: str
    score: Callable[[dict[str, float]], tuple[float, bool]]

    @property
    def name(self) -> str:
        """What the search records as its objective: the kind, or the metric for a plain one."""
        return self.key if self.kind == "metric" else self.kind


def make_objective(search: Search, recipe: Recipe, evaluation: CompositeEvaluation) -> Objective:
    spec, metric = recipe.evaluation, search.metric
    kind = search.objective
    if kind == "auto":
        if all(max(values_of(e.weight)) < 0 for e in recipe.vectors):
            kind = "negation"
        elif set(evaluation.fine_tunes()) == set(spec.tasks) and spec.references:
            kind = "mean_normalized"
        else:
            kind = f"mean.{metric}"
    if kind == "mean_normalized":
        missing = sorted(set(spec.tasks) - set(evaluation.fine_tunes()))
        if missing or not spec.references:
            why = f"task {missing[0]!r} has no input vector of its own" if missing else "evaluation.references is off"
            raise TaskVecError(f"objective mean_normalized needs a fine-tune for every evaluated task: {why}")
        key = f"mean.normalized_{metric}"
        return Objective("mean_normalized", key, f"maximize {key} (composite / fine-tune, averaged over tasks)", lambda m: (m[key], True))
    if kind in ("negation", "analogy"):
        target, base = f"mean.{metric}", f"mean.base_{metric}"
        controls = [f"control.{t}.{metric}" for t in spec.control_tasks]
        ratio = search.control_min_ratio
        sign = -1.0 if kind == "negation" else 1.0  # negation: the drop below the base; analogy: the gain over it

        def keeping_controls(m: dict[str, float]) -> tuple[float, bool]:
            change = sign * (m[target] - m[base])
            shortfall = sum(max(0.0, ratio * m[f"{c[:-len(metric)]}base_{metric}"] - m[c]) for c in controls)
            # Infeasible candidates rank below every feasible one (metrics in [0, 1]).
            return (change, True) if shortfall == 0 else (min(change, 0.0) - 1.0 - shortfall, False)

        what = "the drop of {t} below the base" if kind == "negation" else "the gain of {t} over the base"
        text = f"maximize {what.format(t=target)}" + (
            f", keeping each control task's {metric} at least {ratio:g} x the base's" if controls else ""
        )
        return Objective(kind, target, text, keeping_controls)

    def plain(m: dict[str, float]) -> tuple[float, bool]:
        if kind not in m:
            raise TaskVecError(f"objective {kind!r} is not a metric of this evaluation (metrics: {', '.join(sorted(m))})")
        return m[kind], True

    return Objective("metric", kind, f"maximize {kind}", plain)


ENTROPY = Objective(
    "entropy", "entropy", "minimize the mean entropy of the composite's predictions on unlabeled inputs (AdaMerging)",
    lambda m: (-m["entropy"], True),
)


@dataclass
class Candidate:
    number: int
    scale: float
    weights: list[Coefficient]
    params: dict
    metrics: dict[str, float] = field(default_factory=dict)
    objective: float = float("nan")
    feasible: bool = True
    run_id: str | None = None


@dataclass
class SearchResult:
    candidates: list[Candidate]
    best: Candidate
    recipe: Recipe  # the winning recipe (no search block)
    test_metrics: dict[str, float]
    objective: Objective
    run_id: str
    table: pd.DataFrame
    registered: Registered | None = None
    winning_recipe: Path | None = None  # where the winning recipe was written, if asked

    def lines(self) -> list[str]:
        """The report ``mlflow-taskvec search`` prints: the run, the winner, its test metrics."""
        best = self.best
        weights = ", ".join(describe(w) if isinstance(w, dict) else repr(round(w, 4)) for w in best.weights)
        keys = [k for k in sorted(self.test_metrics) if k.startswith(("mean.", "control."))] or sorted(self.test_metrics)
        return [
            f"search run: {self.run_id}  candidates: {len(self.candidates)}  objective: {self.objective.describe}",
            f"best: scale {best.scale:g}  weights [{weights}]" + (f"  params {json.dumps(best.params)}" if best.params else "")
            + f"  objective {best.objective:.4f} (validation)",
            "test: " + "  ".join(f"{k}={self.test_metrics[k]:.4f}" for k in keys),
            *([f"winning recipe: {self.winning_recipe}"] if self.winning_recipe is not None else []),
            *([self.registered.summary()] if self.registered is not None else []),
        ]


def with_options(recipe: Recipe, recipe_path, **options) -> Recipe:
    """``recipe`` with a command's options for its ``search`` block (those not None), named as
    ``<recipe_path> (with the command's options)``; optuna without a scale range searches 0.0 to 1.0."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return recipe
    settings = {**(recipe.search.model_dump(exclude_unset=True) if recipe.search else {}), **options}
    if options.get("strategy") == "optuna" and "scale" not in settings:
        settings["scale"] = {"low": 0.0, "high": 1.0}
    return recipe.derive(f"{recipe_path} (with the command's options)", search=settings)


def search_recipe(
    recipe_path: "str | os.PathLike",
    strategy: str | None = None,
    objective: str | None = None,
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    memory: str = "auto",
    output_recipe: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    register_as: str | None = None,
    alias: str | None = None,
    allow_mixed: bool = False,
    quiet: bool = True,
    device: str | None = None,
) -> SearchResult:
    """``search`` of the recipe file ``recipe_path``, its ``search`` block overridden by the
    options given (not None), the winning recipe also written to ``output_recipe`` (checked
    before the search's run starts; it never replaces the recipe or a local input)."""
    spec = load_recipe(recipe_path)
    protected = [recipe_path, *local_paths(spec.references, spec.source_dir)]  # the winning recipe never replaces these
    if output_recipe is not None:  # before the search's run is started
        check_output_path(output_recipe, overwrite, inputs=protected, what="winning recipe")
    if device is not None:
        spec.device = device
    spec = with_options(spec, recipe_path, strategy=strategy, objective=objective, trials=trials, storage=storage, study_name=study_name)
    result = search(spec, register_as=register_as, alias=alias, memory=memory, quiet=quiet, allow_mixed=allow_mixed)
    if output_recipe is not None:
        write_text(output_recipe, result.recipe.as_yaml(), "winning recipe", overwrite=overwrite, inputs=protected)
        result.winning_recipe = Path(output_recipe)
    return result


def _fits_in_memory(base_path: Path) -> bool:
    ckpt = open_checkpoint(base_path)
    need = sum(ckpt.spec(n).numel * ckpt.spec(n).dtype.itemsize for n in ckpt.keys())
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    # The candidate's state dict and the module built from it live side by side.
    return 3 * need < available


class _Composer:
    """Builds one candidate's module, in memory or through a temporary folder."""

    def __init__(self, inputs: Inputs, evaluation: CompositeEvaluation, memory: str):
        self.inputs, self.local, self.evaluation = inputs, inputs.local(), evaluation
        if memory not in MEMORY_MODES:
            raise TaskVecError(f"memory mode {memory!r} is not one of {', '.join(MEMORY_MODES)}")
        self.in_memory = _fits_in_memory(inputs.base.path) if memory == "auto" else memory == "memory"

    def candidate(self, cand: Candidate) -> Recipe:
        """The local recipe with the candidate's coefficients."""
        vectors = [e.model_copy(update={"weight": w}) for e, w in zip(self.local.vectors, cand.weights)]
        return self.local.model_copy(update={"scale": cand.scale, "params": cand.params, "vectors": vectors})

    def module(self, cand: Candidate):
        """The candidate's module; its temporary composite (streamed, or an adapter) marks no stage of the
        command: the stages are those of the command's own output (``--output-recipe``) or registration."""
        with stages_owned_by(CANDIDATE):
            return self._module(cand)

    def _module(self, cand: Candidate):
        recipe = self.candidate(cand)
        if recipe.output_format == "peft":  # the base with the candidate's merged adapter, as it is registered
            tmp = Path(tempfile.mkdtemp(prefix="taskvec-candidate-"))
            try:
                with self.inputs.named_as_references():
                    compose_to_adapter(recipe, output=tmp / "adapter")
                return self.evaluation.build(base_with_adapter(self.inputs.base.path, tmp / "adapter"))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.in_memory:
            with self.inputs.named_as_references():
                state = compose(recipe)
            return self.evaluation.build(state)
        tmp = Path(tempfile.mkdtemp(prefix="taskvec-candidate-"))
        try:
            with self.inputs.named_as_references():
                compose_to(recipe, output=tmp / "weights")
            ckpt = open_checkpoint(tmp / "weights")
            return self.evaluation.build({n: ckpt.get_tensor(n) for n in ckpt.keys()})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _labels(recipe: Recipe, evaluation: CompositeEvaluation) -> list[str]:
    labels = []
    for i, item in enumerate(evaluation.inputs):
        label = item.task or f"input{i}"
        labels.append(label if label not in labels else f"{label}{i}")
    return labels


def _evaluate_candidate(cand, composer, evaluation, objective, split, labels, parent_id) -> None:
    cand.metrics = evaluation.evaluate(composer.module(cand), split)
    cand.objective, cand.feasible = objective.score(cand.metrics)
    params = {"scale": cand.scale, **{f"weight.{label}": w for label, w in zip(labels, cand.weights)}}
    params.update({f"params.{k}": v for k, v in cand.params.items()})
    tags = {tag.SEARCH_ROLE: "candidate", tag.SEARCH_FEASIBLE: str(cand.feasible).lower()}
    with mlflow.start_run(run_name=f"candidate-{cand.number:03d}", nested=True, parent_run_id=parent_id, tags=tags) as child:
        # one write for the candidate's params and metrics (a grid logs dozens of candidates)
        now = int(time.time() * 1000)
        MlflowClient().log_batch(
            child.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in {**cand.metrics, "objective": cand.objective}.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        cand.run_id = child.info.run_id


def _grid(search, recipe, composer, evaluation, objective, labels, parent_id, quiet) -> list[Candidate]:
    weights = [e.weight for e in recipe.vectors]
    scales = search.scale.grid()
    step, close = progress_bar(len(scales), "search", "candidate", quiet)
    candidates = []
    try:
        for number, scale in enumerate(scales):
            cand = Candidate(number, scale, list(weights), dict(recipe.params))
            _evaluate_candidate(cand, composer, evaluation, objective, search.validation_split, labels, parent_id)
            candidates.append(cand)
            step()
    finally:
        close()
    return candidates


def _optuna(search, recipe, composer, evaluation, objective, labels, parent_id, quiet) -> tuple[list[Candidate], dict | None]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=search.seed) if search.sampler == "tpe" else optuna.samplers.RandomSampler(seed=search.seed)
    study = _open_study(optuna, search, sampler)
    candidates: list[Candidate] = []
    method = get_method(recipe.method)
    step, close = progress_bar(search.trials, "search", "candidate", quiet)

    def suggest(trial, name: str, r) -> float:
        return trial.suggest_float(name, r.low, r.high, step=None if r.log else r.step, log=r.log)

    method = get_method(recipe.method)

    def run_trial(trial) -> float:
        scale = suggest(trial, "scale", search.scale)
        weights = [e.weight for e in recipe.vectors]
        if search.weights is not None:  # each weight's sign from the recipe (per-layer weights are refused there)
            weights = [(-1.0 if w < 0 else 1.0) * suggest(trial, f"weight.{label}", search.weights) for w, label in zip(weights, labels)]
        params = dict(recipe.params)
        for name, r in search.params.items():
            value = suggest(trial, f"params.{name}", r)
            params[name] = int(round(value)) if method.param(name).type is int else value
        try:  # parameters sampled each from its own range may still not fit together (breadcrumbs: density + gamma <= 1)
            validate_params(method, params)
        except TaskVecError as exc:
            trial.set_user_attr("refused", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        cand = Candidate(len(candidates), scale, weights, params)
        _evaluate_candidate(cand, composer, evaluation, objective, search.validation_split, labels, parent_id)
        candidates.append(cand)
        trial.set_user_attr("feasible", cand.feasible)
        trial.set_user_attr("weights", cand.weights)
        trial.set_user_attr("params", cand.params)
        trial.set_user_attr("mlflow_run_id", cand.run_id)
        step()
        return cand.objective

    quiet_interrupts = _NoInterruptTracebacks()
    optuna_log = logging.getLogger("optuna.study._optimize")  # logs a trial a signal stopped, with its traceback
    optuna_log.addFilter(quiet_interrupts)
    try:
        study.optimize(run_trial, n_trials=search.trials, catch=())
    finally:
        optuna_log.removeFilter(quiet_interrupts)
        close()
    # The winner over the whole study: with shared storage, other workers' trials count too.
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    ranked = sorted(done, key=lambda t: (bool(t.user_attrs.get("feasible", True)), t.value), reverse=True)
    best = ranked[0] if ranked else None
    shared = None
    if best is not None:
        shared = {
            "trial": best.number,
            "scale": best.params["scale"],
            "weights": best.user_attrs.get("weights"),
            "params": best.user_attrs.get("params"),
            "value": best.value,
            "feasible": best.user_attrs.get("feasible", True),
            "run_id": best.user_attrs.get("mlflow_run_id"),
            "study": study.study_name,
            "trials_in_study": len(done),
        }
    return candidates, shared


class _NoInterruptTracebacks(logging.Filter):
    """Drop optuna's records of a trial that Ctrl-C, SIGTERM or SIGHUP stopped (its traceback, then
    "failed with value None"): the command says it in one line."""

    stopped = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.stopped = True
        return not self.stopped


def _open_study(optuna, search: Search, sampler):
    """Create or join the study. Workers starting together race to create optuna's
    tables and the study itself; the loser retries and joins."""
    for attempt in range(6):
        try:
            return optuna.create_study(
                direction="maximize", sampler=sampler, storage=search.storage, study_name=search.study_name, load_if_exists=True
            )
        except ImportError as exc:
            raise TaskVecError(f"search.storage: {exc} (for PostgreSQL: pip install 'mlflow-taskvec[postgres]')") from None
        except Exception as exc:  # optuna and SQLAlchemy raise many types for a bad URL, a race or an unreachable database
            error = exc
            if search.storage is None:
                break
            time.sleep(0.2 + random.random() * (attempt + 1))
    where = search.storage.split("@")[-1] if search.storage else "memory"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise TaskVecError(f"search.storage: cannot open the optuna study at {where}: {first}") from None


def _table(candidates: list[Candidate], labels: list[str]) -> pd.DataFrame:
    rows = []
    for c in candidates:
        row = {"candidate": c.number, "scale": c.scale}
        row.update({f"weight.{label}": w if isinstance(w, float) else describe(w) for label, w in zip(labels, c.weights)})
        row.update({f"params.{k}": v for k, v in c.params.items()})
        row.update({"objective": c.objective, "feasible": c.feasible})
        row.update(dict(sorted(c.metrics.items())))
        row["run_id"] = c.run_id
        rows.append(row)
    return pd.DataFrame(rows)


def _plot(table: pd.DataFrame, objective: Objective, best: Candidate, spec, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ordered = table.sort_values("scale")
    if ordered["scale"].duplicated().any() or len(ordered) < 2:  # optuna: a scatter
        ax.scatter(ordered["scale"], ordered["objective"], s=14, label="objective")
    else:
        ax.plot(ordered["scale"], ordered["objective"], lw=2.2, color="black", label="objective")
        for task in spec.tasks:
            key = f"{task}.{metric}"
            if key in ordered:
                ax.plot(ordered["scale"], ordered[key], lw=1, label=key)
        for task in spec.control_tasks:
            key = f"control.{task}.{metric}"
            if key in ordered:
                ax.plot(ordered["scale"], ordered[key], lw=1, ls="--", label=key)
    ax.axvline(best.scale, color="grey", ls=":", lw=1)
    ax.set_xlabel("scale")
    ax.set_ylabel(f"validation {metric} / objective")
    ax.set_title(objective.describe, fontsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def search(
    recipe: Recipe,
    register_as: str | None = None,
    alias: str | None = None,
    memory: str = "auto",
    quiet: bool = True,
    allow_mixed: bool = False,
) -> SearchResult:
    """Search ``recipe``'s coefficients as its ``search`` block says (defaults: the paper's grid).

    With ``register_as``, the registered model is checked first (permission, and versions
    mlflow-taskvec did not make unless ``allow_mixed``): a refusal comes before the search, not after it.
    """
    settings = recipe.search or Search()
    if recipe.evaluation is None:
        raise TaskVecError("search needs an 'evaluation' block in the recipe (evaluator and tasks)")
    check_recipe_device(recipe)  # before a run is started
    if register_as is not None:
        check_destination(register_as, allow_mixed)
    inputs = resolve_inputs(recipe)  # the policy first: before anything is downloaded or evaluated
    base = inputs.base
    evaluation = composite_evaluation(inputs)
    if settings.strategy == "adamerging":
        from mlflow_taskvec.mlflow import adamerging

        adamerging.check_can_learn(recipe, evaluation)  # before a run starts
        objective = ENTROPY
    else:
        objective = make_objective(settings, recipe, evaluation)
    composer = _Composer(inputs, evaluation, memory)
    labels = _labels(recipe, evaluation)

    # From the winner's version's creation on, a signal waits until the search's own run has ended
    # FINISHED too (signals.extend_hold: entered before the winner registers, left after this run ends).
    held_to_the_end = contextlib.ExitStack()
    with held_to_the_end, owned_run(None) as run, tempfile.TemporaryDirectory(prefix="taskvec-search-") as tmp:
        parent_id = run.info.run_id
        mlflow.set_tag(tag.SEARCH_ROLE, "search")
        mlflow.log_params(
            {
                "search.strategy": settings.strategy,
                "search.objective": objective.name,
                "search.metric": settings.metric,
                "search.validation_split": settings.validation_split,
                "search.scale": str(settings.scale),
                "search.trials": _planned_trials(settings),
                "method": recipe.method,
                "base": base.canonical,
                **{f"input.{label}": r.canonical for label, r in zip(labels, inputs.vectors)},
            }
        )
        args = (settings, recipe, composer, evaluation, objective, labels, parent_id, quiet)
        shared = None
        folder = Path(tmp) / "search"
        folder.mkdir()
        if settings.strategy == "grid":
            candidates = _grid(*args)
        elif settings.strategy == "optuna":
            candidates, shared = _optuna(*args)
        else:
            weights, learned = adamerging.learn_in_run(recipe, base.path, evaluation, labels, folder, quiet)
            # the learned composite is the one candidate; no labels are read before the test split
            metrics = {"entropy": learned.final_entropy, "initial_entropy": learned.initial_entropy}
            candidates = [Candidate(0, 1.0, weights, dict(recipe.params), metrics, -learned.final_entropy, True)]
        best = _pick(candidates, shared)
        vectors = [{**entry.model_dump(exclude_unset=True), "weight": weight} for entry, weight in zip(recipe.vectors, best.weights)]
        winner = recipe.derive("the search's winning recipe", scale=best.scale, params=best.params, search=None, vectors=vectors)

        # A winner from another worker of a shared study is listed too, as candidate -1.
        table = _table(candidates if best.number >= 0 else [*candidates, best], labels)
        table.to_csv(folder / "candidates.csv", index=False)
        if settings.strategy != "adamerging":  # one learned candidate: its pictures are the coefficients and the entropy curve
            _plot(table, objective, best, recipe.evaluation, settings.metric, folder / "objective_vs_scale.png")
        (folder / "best_recipe.yaml").write_text(winner.as_yaml(), "utf-8")
        mlflow.log_artifacts(str(folder), artifact_path="search")

        test_split = recipe.evaluation.split
        summary = {
            "strategy": settings.strategy,
            "objective": objective.name,
            "metric": settings.metric,
            "validation_split": settings.validation_split,
            "test_split": test_split,
            "candidates": len(candidates),
            "best_candidate_run_id": best.run_id,
            "best_value": best.objective,
            "search_run_id": parent_id,
        }
        if shared is not None:
            summary.update({"study": shared["study"], "trials_in_study": shared["trials_in_study"]})
        registered = None
        if register_as is not None:
            held_to_the_end.enter_context(extend_hold())
            with mlflow.start_run(run_name="winner", nested=True, parent_run_id=parent_id):  # signals.py: stages
                mlflow.set_tag(tag.SEARCH_ROLE, "winner")
                registered = register_composite(
                    winner, register_as, alias=alias,
                    evaluate=lambda model: evaluation.evaluate(model, test_split),
                    extra_tags={tag.SEARCH: json.dumps(summary, sort_keys=True)},
                    note=_note(summary, objective, settings),
                    allow_mixed=allow_mixed,
                )
            test_metrics = dict(mlflow.get_run(registered.run_id).data.metrics)
        else:
            test_metrics = evaluation.evaluate(composer.module(best), test_split)
        mlflow.log_metrics({"best.objective": best.objective, "best.scale": best.scale, **{f"test.{k}": v for k, v in test_metrics.items()}})
        mlflow.set_tag(tag.SEARCH_BEST_RUN_ID, best.run_id or "")
    return SearchResult(candidates, best, winner, test_metrics, objective, parent_id, table, registered)


def _run_metrics(run_id: str | None) -> dict[str, float]:
    """A candidate run's validation metrics; empty when it cannot be read (a worker
    that shares the optuna storage but logs to another tracking store, or a
    deleted run): its coefficients are all the winner needs."""
    if not run_id:
        return {}
    try:
        metrics = dict(mlflow.get_run(run_id).data.metrics)
    except MlflowException:
        return {}
    metrics.pop("objective", None)  # logged beside the metrics; the candidate has its own field
    return metrics


def _pick(candidates: list[Candidate], shared: dict | None) -> Candidate:
    if shared is not None and not any(c.run_id == shared["run_id"] for c in candidates):
        # Another worker found the study's best trial: take its coefficients, and its
        # validation metrics from that worker's candidate run.
        metrics = _run_metrics(shared["run_id"])
        return Candidate(-1, shared["scale"], list(shared["weights"]), dict(shared["params"]), metrics=metrics,
                         objective=shared["value"], feasible=shared["feasible"], run_id=shared["run_id"])
    if not candidates:
        raise TaskVecError("the search evaluated no candidate")
    # Feasible first, then the objective; ties go to the earliest (the smallest scale on a grid).
    best = max(candidates, key=lambda c: (c.feasible, c.objective, -c.number))
    if not math.isfinite(best.objective):
        raise TaskVecError("no candidate has a finite objective")
    return best


def _planned_trials(settings: Search) -> int:
    """Candidates of a grid, trials of optuna, steps of AdaMerging."""
    if settings.strategy == "optuna":
        return settings.trials
    if settings.strategy == "adamerging":
        return (settings.adamerging or AdaMerging()).steps
    return len(settings.scale.grid())


def _note(summary: dict, objective: Objective, settings: Search) -> str:
    if settings.strategy == "grid":
        how = f"a grid over scale {settings.scale}"
    elif settings.strategy == "optuna":
        how = f"optuna ({settings.sampler}, {summary.get('trials_in_study', summary['candidates'])} trials)"
    else:
        ada = settings.adamerging or AdaMerging()
        how = f"AdaMerging ({'layer-wise' if ada.layerwise else 'task-wise'}, {ada.steps} Adam steps at lr {ada.lr:g}, no labels read)"
    return (
        f"Coefficients picked by search: {how}, {objective.describe} on the {summary['validation_split']} split "
        f"(best {summary['best_value']:.4g}); metrics below are on the {summary['test_split']} split. "
        f"Search run `{summary['search_run_id']}`."
    )
