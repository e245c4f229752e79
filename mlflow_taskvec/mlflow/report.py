"""Tables of registered composites, for people and for scripts."""

from __future__ import annotations

import fnmatch
import functools
import json

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_taskvec.engine.coefficients import describe
from mlflow_taskvec.errors import TaskVecError
from mlflow_taskvec.mlflow import tags as tag


def _versions(client: MlflowClient, name: str, run_of) -> tuple[list, str]:
    """The versions of registered model ``name``, else those composed in experiment ``name``
    (``run_of(run_id)`` reads a run; the caller's cache keeps it for the metrics)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise TaskVecError(f"{name}: {str(exc).splitlines()[0]}") from None
    if versions:
        return versions, "registered model"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise TaskVecError(f"{name}: no registered model or experiment of this name")
    found = []
    for mv in client.search_model_versions(""):
        if (mv.tags or {}).get(tag.KIND) != tag.COMPOSITE or not mv.run_id:
            continue
        if run_of(mv.run_id).info.experiment_id == experiment.experiment_id:
            found.append(mv)
    return found, "experiment"


def _scale(text: str):
    """The taskvec.scale tag: a number, or a per-layer mapping's JSON text kept as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def composites_frame(name: str, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per composite registered under model ``name`` (or composed in experiment ``name``):
    method, scale, params, inputs with weights, and the metrics of the run that composed it
    (those matching the ``metrics`` globs, when given)."""
    client = MlflowClient()
    run_of = functools.lru_cache(maxsize=None)(client.get_run)
    versions, what = _versions(client, name, run_of)
    rows = []
    for mv in sorted(versions, key=lambda v: (v.name, int(v.version))):
        tags = mv.tags or {}
        if tags.get(tag.KIND) != tag.COMPOSITE:
            continue
        inputs = json.loads(tags.get(tag.INPUTS, "[]"))
        row = {
            "name": mv.name,
            "version": int(mv.version),
            "method": tags.get(tag.METHOD, ""),
            "scale": _scale(tags.get(tag.SCALE, "nan")),
            "params": tags.get(tag.PARAMS, "{}"),
            "weights": ", ".join(f"{i['uri']}:{describe(i['weight'])}" for i in inputs),
        }
        if mv.run_id:
            values = run_of(mv.run_id).data.metrics
            keep = sorted(k for k in values if not metrics or any(fnmatch.fnmatchcase(k, p) for p in metrics))
            row.update((k, values[k]) for k in keep)
        rows.append(row)
    if not rows:
        raise TaskVecError(f"{name}: no composite versions registered under this {what}")
    frame = pd.DataFrame(rows)
    if frame["name"].nunique() == 1:
        return frame.drop(columns="name").set_index("version")
    return frame.set_index(["name", "version"])
