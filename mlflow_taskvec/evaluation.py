"""Evaluating models with a user's evaluator callable.

An evaluator is ``package.module:function(model, task, split) -> dict[str, float]``.
Metrics are named ``<task>.<metric>``, ``control.<task>.<metric>`` for control
tasks, and ``mean.<metric>`` for the average over the (non-control) tasks.
Against references (the base, and each task's own fine-tune) come the paper's
normalized accuracy and the delta against the base (``derived_metrics``).
No MLflow here: the tracking layer builds the models and logs the metrics.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mlflow_taskvec.callables import import_callable
from mlflow_taskvec.engine.writer import write_text_atomically
from mlflow_taskvec.errors import TaskVecError

Evaluator = Callable[[object, str, str], dict]


def load_evaluator(spec: str) -> Evaluator:
    return import_callable(spec, "evaluator")


def _per_task(tasks, control_tasks, metrics_of: Callable[[str, str], dict[str, float]]) -> dict[str, float]:
    """``metrics_of(prefix, task)`` for each task (prefix ``""``), then each control task
    (prefix ``"control."``), named ``<prefix><task>.<metric>``; and ``mean.<metric>``,
    the average of each metric over the (non-control) tasks that have it."""
    out: dict[str, float] = {}
    means: dict[str, list[float]] = {}
    for prefix, task_list in (("", tasks), ("control.", control_tasks)):
        for task in task_list:
            for key, value in metrics_of(prefix, task).items():
                out[f"{prefix}{task}.{key}"] = value
                if not prefix:
                    means.setdefault(key, []).append(value)
    for key, values in means.items():
        out[f"mean.{key}"] = sum(values) / len(values)
    return out


def evaluate_model(model, evaluator: Evaluator, tasks, control_tasks=(), split: str = "test", name: str = "evaluator") -> dict[str, float]:
    """Run ``evaluator`` on every task; raises TaskVecError naming the task when it fails."""
    return _per_task(tasks, control_tasks, lambda prefix, task: task_metrics(evaluator, model, task, split, name))


# -- a module's forward on an evaluator's unlabeled batch -----------------------------------


def call_args(batch, device=None) -> tuple[tuple, dict]:
    """An ``evaluator.unlabeled`` batch as (args, kwargs) of the module's forward, tensors on
    ``device``: a dict is keyword arguments, a tuple or list positional ones, anything else the one argument."""
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v  # noqa: E731
    if isinstance(batch, dict):
        return (), {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(move(v) for v in batch), {}
    return (move(batch),), {}


def logits_of(output) -> torch.Tensor:
    """The logits a forward returned: the tensor, its ``.logits``, or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TaskVecError(f"the module's forward returned {type(output).__name__}, not logits (a tensor, or an output with .logits)")


# -- references: the base and each fine-tune, cached by fingerprint ------------------------


def evaluator_identity(spec: str) -> str:
    """``spec`` plus a digest of the file that defines it: editing the evaluator invalidates its cache."""
    fn = load_evaluator(spec)
    try:
        source = Path(inspect.getsourcefile(fn) or "")
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16] if source.is_file() else "nosource"
    except (TypeError, OSError):
        digest = "nosource"
    return f"{spec}@{digest}"


class MetricCache:
    """Metrics of a model on a task and split, kept in ``directory`` keyed by the model's fingerprint.

    A reference model (the base, a fine-tune) is evaluated once per evaluator,
    task and split, however many composites and search candidates compare to it.
    """

    def __init__(self, directory: "str | os.PathLike | None"):
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, fingerprint: str, evaluator: str, task: str, split: str) -> Path:
        key = hashlib.sha256(json.dumps([fingerprint, evaluator, task, split]).encode("utf-8")).hexdigest()
        return self.directory / f"{key}.json"

    def get(self, fingerprint: str, evaluator: str, task: str, split: str) -> dict[str, float] | None:
        if self.directory is None:
            return None
        path = self._path(fingerprint, evaluator, task, split)
        try:
            record = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            self.misses += 1
            return None
        if record.get("fingerprint") != fingerprint or not isinstance(record.get("metrics"), dict):
            self.misses += 1
            return None
        self.hits += 1
        return {k: float(v) for k, v in record["metrics"].items()}

    def put(self, fingerprint: str, evaluator: str, task: str, split: str, metrics: dict[str, float]) -> None:
        if self.directory is None:
            return
        record = {"fingerprint": fingerprint, "evaluator": evaluator, "task": task, "split": split, "metrics": metrics}
        write_text_atomically(self._path(fingerprint, evaluator, task, split), json.dumps(record))


def task_metrics(evaluator: Evaluator, model, task: str, split: str, name: str = "evaluator") -> dict[str, float]:
    """``evaluator(model, task, split)``, checked: a dict of finite numbers."""
    try:
        result = evaluator(model, task, split)
    except Exception as exc:  # the user's code: report it in one line
        raise TaskVecError(f"{name} failed on task {task!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, dict):
        raise TaskVecError(f"{name} returned {type(result).__name__} for task {task!r}, not a dict of metrics")
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TaskVecError(f"{name} returned {key}={value!r} for task {task!r}, not a finite number")
    return {k: float(v) for k, v in result.items()}


def cached_task_metrics(
    cache: MetricCache, identity: str, fingerprint: str, build: Callable[[], object], evaluator: Evaluator, task: str, split: str, name: str
) -> dict[str, float]:
    """Metrics of the model with ``fingerprint`` on ``task``; ``build()`` makes the model only on a cache miss."""
    found = cache.get(fingerprint, identity, task, split)
    if found is not None:
        return found
    metrics = task_metrics(evaluator, build(), task, split, name)
    cache.put(fingerprint, identity, task, split, metrics)
    return metrics


@dataclass
class References:
    """Metrics of the base on every task and of each task's own fine-tune on its task."""

    base: dict[str, dict[str, float]]  # task -> metrics (tasks and control tasks)
    finetuned: dict[str, dict[str, float]]  # task -> metrics, for tasks that have a fine-tune


def derived_metrics(composite: dict[str, float], refs: References, tasks, control_tasks=()) -> dict[str, float]:
    """Normalized and delta metrics of a composite, as in the task-arithmetic paper.

    For each metric ``m`` of task ``t``: ``t.base_m`` (the base's), ``t.delta_m``
    (composite minus base), and, when ``t`` has a fine-tune, ``t.finetuned_m`` and
    ``t.normalized_m`` (composite / fine-tune). Control tasks get base and delta.
    ``mean.*`` averages each over the tasks that have it.
    """

    def derived(prefix: str, task: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, base_value in refs.base.get(task, {}).items():
            value = composite.get(f"{prefix}{task}.{key}")
            if value is None:
                continue
            out[f"base_{key}"] = base_value
            out[f"delta_{key}"] = value - base_value
            ft = refs.finetuned.get(task, {}).get(key) if not prefix else None
            if ft is not None:
                out[f"finetuned_{key}"] = ft
                if ft != 0:
                    out[f"normalized_{key}"] = value / ft
        return out

    return _per_task(tasks, control_tasks, derived)
