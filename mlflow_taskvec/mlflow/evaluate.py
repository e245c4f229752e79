"""Evaluating a composite against its references: the base and each task's fine-tune.

A ``CompositeEvaluation`` is made once per recipe and used for every model it
is asked about (the registered composite, or each candidate of a search):

- the base is evaluated on every task and control task;
- each input vector whose task is one of the evaluated tasks stands for that
  task's fine-tune: a ``finetuned:`` input is that checkpoint, a ``vector:``
  input is ``base + vector`` (the fine-tune itself, for the tensors the vector
  covers);
- reference metrics are cached by fingerprint in ``$MLFLOW_TASKVEC_CACHE/metrics``,
  so a base shared by ten composites, or twenty search candidates, is evaluated
  once per evaluator, task and split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mlflow.utils.model_utils import _add_code_from_conf_to_system_path

from mlflow_taskvec import compose
from mlflow_taskvec.engine.linearize import linearize
from mlflow_taskvec.engine.taskvector import TaskVector
from mlflow_taskvec.mlflow import flavor
from mlflow_taskvec.mlflow import flavor_conf as conf_keys
from mlflow_taskvec.engine.coefficients import Coefficient, values_of
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.evaluation import (
    MetricCache,
    References,
    cached_task_metrics,
    derived_metrics,
    evaluate_model,
    evaluator_identity,
    load_evaluator,
)
from mlflow_taskvec.mlflow import tags as tag
from mlflow_taskvec.mlflow.downloads import Resolved, cache_root
from mlflow_taskvec.mlflow.inputs import Inputs

Builder = Callable[[Mapping[str, torch.Tensor]], torch.nn.Module]


def fine_tuning_of(vectors: list[Resolved]) -> str:
    """``linear`` when every input is a linearized fine-tune's vector (tag ``taskvec.fine_tuning``),
    ``standard`` when none is; a mix is refused (the two live in different models)."""
    kinds = {r.tags.get(tag.FINE_TUNING, "standard") for r in vectors}
    if len(kinds) > 1:
        raise TaskVecError("the recipe mixes task vectors of linearized and standard fine-tunes (taskvec.fine_tuning): they live in different models")
    return kinds.pop() if kinds else "standard"


def module_builder(base: Resolved, factory: str | None = None, factory_kwargs: Mapping | None = None, linear: bool = False) -> Builder:
    """How to turn a state dict of ``base``'s architecture into a module.

    The recipe's ``evaluation.factory`` wins; else the base's own architecture
    (a ``checkpoint``-kind taskvec model, or an HF folder with ``config.json``).
    With ``linear`` (composites of linearized fine-tunes' vectors) the module is the
    first-order Taylor model around the base's weights, ``f(x; b) + J(b)(w - b)``, with
    ``w`` the state dict (``engine.linearize``).
    """
    plain = _plain_builder(base, factory, factory_kwargs)
    if not linear:
        return plain
    base_state: dict = {}

    def linearized(state):
        if not base_state:
            base_state.update(flavor.read_state(base.path))
        return linearize(plain(state), base_state)

    return linearized


def _plain_builder(base: Resolved, factory: str | None, factory_kwargs: Mapping | None) -> Builder:
    if factory:
        return lambda state: flavor.module_from_factory(factory, factory_kwargs or {}, state)
    if base.conf and base.conf.get(conf_keys.KIND) == conf_keys.CHECKPOINT and base.model_dir is not None:
        _add_code_from_conf_to_system_path(str(base.model_dir), base.conf)
        conf, weights = base.conf, base.path
        return lambda state: flavor.build_module(conf, weights, state)
    if base.path.is_dir() and (base.path / "config.json").is_file():
        conf, weights = {conf_keys.ARCHITECTURE: {conf_keys.HF_CONFIG: True}}, base.path
        return lambda state: flavor.build_module(conf, weights, state)
    raise TaskVecError(
        f"base {base.canonical} records no architecture, so there is no model to evaluate: "
        "set evaluation.factory ('package.module:function') in the recipe, or use a checkpoint-kind taskvec base"
    )


@dataclass
class Input:
    """One input of a composite, as the evaluation sees it."""

    vector: TaskVector
    fingerprint: str  # of the vector, or of the fine-tune for ``finetuned:`` inputs
    task: str | None
    weight: Coefficient
    finetuned_path: Path | None = None  # set for ``finetuned:`` inputs


class CompositeEvaluation:
    """The recipe's evaluation: ``evaluate(model, split)`` gives the composite's metrics and the derived ones."""

    def __init__(self, spec, base: Resolved, inputs: list[Input], cache: MetricCache | None = None, linear: bool = False):
        self.spec = spec
        self.base = base
        self.inputs = inputs
        self.linear = linear  # the inputs are linearized fine-tunes' vectors: every model is linearized at the base
        self.build_plain = module_builder(base, spec.factory, spec.factory_kwargs)  # first: puts the model's code on sys.path
        self.build = module_builder(base, spec.factory, spec.factory_kwargs, linear=True) if linear else self.build_plain
        self.evaluator = load_evaluator(spec.evaluator)
        self.identity = evaluator_identity(spec.evaluator)
        self.cache = cache if cache is not None else MetricCache(cache_root() / "metrics")
        self._references: dict[str, References] = {}

    @property
    def name(self) -> str:
        return self.spec.evaluator

    def fine_tunes(self) -> dict[str, Input]:
        """For each evaluated task, the input that stands for its fine-tune (the first with a positive weight)."""
        found: dict[str, Input] = {}
        for item in self.inputs:
            if item.task in self.spec.tasks and min(values_of(item.weight)) > 0 and item.task not in found:
                found[item.task] = item
        return found

    def references(self, split: str) -> References:
        if split in self._references:
            return self._references[split]
        base_state = None

        def base_module():
            nonlocal base_state
            if base_state is None:
                base_state = flavor.read_state(self.base.path)
            return self.build(base_state)

        base_metrics = {}
        for task in [*self.spec.tasks, *self.spec.control_tasks]:
            base_metrics[task] = cached_task_metrics(
                self.cache, self.identity, self.base.fingerprint, base_module, self.evaluator, task, split, self.name
            )
        finetuned = {}
        if self.spec.references:
            for task, item in self.fine_tunes().items():
                finetuned[task] = cached_task_metrics(
                    self.cache, self.identity, self._finetune_key(item), lambda item=item: self._finetune_module(item),
                    self.evaluator, task, split, self.name,
                )
        refs = References(base=base_metrics, finetuned=finetuned)
        self._references[split] = refs
        return refs

    def _finetune_key(self, item: Input) -> str:
        if item.finetuned_path is not None:
            return item.fingerprint
        return hashlib.sha256(f"{self.base.fingerprint}+{item.fingerprint}".encode()).hexdigest()

    def _finetune_module(self, item: Input) -> torch.nn.Module:
        if item.finetuned_path is not None:
            return self.build(flavor.read_state(item.finetuned_path))
        return self.build(item.vector.apply_to(self.base.path, 1.0))

    def evaluate(self, model, split: str | None = None) -> dict[str, float]:
        """The composite's metrics on ``split`` (default: the recipe's), with base/fine-tune comparisons."""
        split = split or self.spec.split
        metrics = evaluate_model(model, self.evaluator, self.spec.tasks, self.spec.control_tasks, split, name=self.name)
        metrics.update(derived_metrics(metrics, self.references(split), self.spec.tasks, self.spec.control_tasks))
        return metrics


def composite_evaluation(inputs: Inputs, cache: MetricCache | None = None) -> CompositeEvaluation:
    """The recipe's evaluation over its resolved (local) inputs; the recipe must have an ``evaluation`` block."""
    recipe = inputs.recipe
    if recipe.evaluation is None:
        raise TaskVecError("the recipe has no 'evaluation' block: name an evaluator and the tasks to evaluate")
    local = inputs.local()
    vectors = compose.vectors_of(local, compose.open_base(local))
    items = []
    for entry, res, vector in zip(recipe.vectors, inputs.vectors, vectors):
        if entry.vector is not None:
            items.append(Input(vector, res.fingerprint, entry.task or vector.task, entry.weight))
        else:
            items.append(Input(vector, res.fingerprint, entry.task, entry.weight, finetuned_path=res.path))
    return CompositeEvaluation(recipe.evaluation, inputs.base, items, cache, linear=fine_tuning_of(inputs.vectors) == "linear")
