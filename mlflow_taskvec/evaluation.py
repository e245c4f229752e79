"""Evaluating models with a user's evaluator callable.

An evaluator is ``package.module:function(model, task, split) -> dict[str, float]``.
Metrics are named ``<task>.<metric>``, ``control.<task>.<metric>`` for control
tasks, and ``mean.<metric>`` for the average over the (non-control) tasks.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from mlflow_taskvec.errors import TaskVecError

Evaluator = Callable[[object, str, str], dict]


def load_evaluator(spec: str) -> Evaluator:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskVecError(f"evaluator {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskVecError(f"evaluator {spec!r} cannot be imported ({exc})") from None
    if not callable(fn):
        raise TaskVecError(f"evaluator {spec!r} is not callable")
    return fn


def evaluate_model(model, evaluator: Evaluator, tasks, control_tasks=(), split: str = "test", name: str = "evaluator") -> dict[str, float]:
    """Run ``evaluator`` on every task; raises TaskVecError naming the task when it fails."""
    metrics: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for prefix, task_list in (("", tasks), ("control.", control_tasks)):
        for task in task_list:
            try:
                result = evaluator(model, task, split)
            except Exception as exc:  # the user's code: report it in one line
                raise TaskVecError(f"{name} failed on task {task!r}: {type(exc).__name__}: {exc}") from None
            if not isinstance(result, dict):
                raise TaskVecError(f"{name} returned {type(result).__name__} for task {task!r}, not a dict of metrics")
            for key, value in result.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise TaskVecError(f"{name} returned {key}={value!r} for task {task!r}, not a finite number")
                metrics[f"{prefix}{task}.{key}"] = float(value)
                if not prefix:
                    per_metric.setdefault(key, []).append(float(value))
    for key, values in per_metric.items():
        metrics[f"mean.{key}"] = sum(values) / len(values)
    return metrics
